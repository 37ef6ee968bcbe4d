"""`--experts` items: a file of one expert per line (LoraHub's 196 ids are such a file), a
PEFT dir or a Hub id; nothing of ../shared/data ships with the package."""
from pathlib import Path

from conftest import SHARED_DATA
from lorahub_compeft.eval.expert_lists import experts_from_args, resolve_experts

REPO = Path(__file__).resolve().parents[1]


def test_files_paths_and_ids_resolve(tmp_path):
    listing = tmp_path / "experts.txt"
    listing.write_text("# mine\norg/a\n\n./local-dir\n")
    assert resolve_experts([str(listing), "org/b"]) == ["org/a", "./local-dir", "org/b"]
    assert experts_from_args(["org/c"], str(listing)) == ["org/c", "org/a", "./local-dir"]


def test_the_shared_expert_list_is_not_copied_into_the_package():
    listed = (SHARED_DATA / "lorahub_flan_t5_large_modules.txt")
    ids = {line.strip() for line in listed.read_text().splitlines()} if listed.is_file() else set()
    for path in (REPO / "lorahub_compeft").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".txt"):
            text = path.read_text(errors="ignore")
            assert sum(i in text for i in list(ids)[:20]) < 5, path


def test_an_expert_file_is_an_expert_not_a_list(lora_dir, tmp_path):
    from lorahub_compeft.store.expert import compress
    path = tmp_path / "red.safetensors"
    compress(lora_dir).save(path)
    listing = tmp_path / "experts.txt"
    listing.write_text(f"{path}\n")
    assert resolve_experts([str(path), str(listing)]) == [str(path), str(path)]
