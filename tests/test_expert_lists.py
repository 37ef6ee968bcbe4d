"""The expert list ships with the package and is addressable by name: `--experts
lorahub-flan-t5-large` (or `--experts-file lorahub-flan-t5-large`) is LoraHub's 196."""
import configparser
import fnmatch
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from lorahub_compeft.eval import expert_lists
from lorahub_compeft.eval.expert_lists import expert_list, experts_from_args, resolve_experts

REPO = Path(__file__).resolve().parents[1]
SHARED_LIST = SHARED_DATA / "lorahub_flan_t5_large_modules.txt"


@pytest.mark.skipif(not SHARED_LIST.is_file(), reason="../shared/data not present")
def test_the_name_is_the_196_ids_of_the_shared_list():
    shared = [line.strip() for line in SHARED_LIST.read_text().splitlines() if line.strip()]
    ids = resolve_experts(["lorahub-flan-t5-large"])
    assert len(ids) == 196 and len(set(ids)) == 196
    assert ids == shared
    assert experts_from_args([], "lorahub-flan-t5-large") == shared


def test_every_entry_has_an_id_and_a_revision_field():
    entries = expert_list("lorahub-flan-t5-large")
    assert all(set(e) == {"id", "revision"} and e["id"].startswith("lorahub/flan_t5_large-")
               for e in entries)


def test_the_list_is_package_data():
    """setup.cfg installs the list: its package_data glob matches the file."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    globs = [g.strip() for g in cfg["options.package_data"]["lorahub_compeft.eval"].split(",")]
    data = REPO / "lorahub_compeft" / "eval"
    shipped = [str(p.relative_to(data)) for p in (data / "data").glob("*.json")]
    assert shipped and all(any(fnmatch.fnmatch(f, g) for g in globs) for f in shipped)
    assert "lorahub-flan-t5-large" in expert_lists.list_names()


def test_files_paths_and_ids_resolve_as_before(tmp_path, monkeypatch):
    listing = tmp_path / "experts.txt"
    listing.write_text("# mine\norg/a\n\n./local-dir\n")
    assert resolve_experts([str(listing), "org/b"]) == ["org/a", "./local-dir", "org/b"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lorahub-flan-t5-large").mkdir()  # a folder of that name wins, as a path
    assert resolve_experts(["lorahub-flan-t5-large"]) == ["lorahub-flan-t5-large"]


def test_an_unknown_list_name_names_the_shipped_ones():
    with pytest.raises(ValueError, match="lorahub-flan-t5-large"):
        expert_list("no-such-list")
