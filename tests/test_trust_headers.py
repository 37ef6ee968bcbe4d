"""Forged headers a reader must refuse with an ExpertFileError naming the field (never another
exception): NaN or Infinity in a re-signed v2 header, and ERE fields of the wrong type or range."""

import pytest

import support
from lorahub_compeft import ExpertFileError, compress, load_expert
from lorahub_compeft.config import EreOptions


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_infinity_in_a_signed_header_is_an_expert_file_error(lora_dir, tmp_path, value):
    path = compress(lora_dir).save(tmp_path / "e.safetensors")
    support.edit_v2_header(path, lambda m: m.update(sigma=value), allow_nan=True)
    with pytest.raises(ExpertFileError, match="NaN or Infinity"):
        load_expert(path)


@pytest.mark.parametrize("field, value", [
    ("budget_bits", None), ("budget_bits", "1"), ("budget_bits", -1.0), ("budget_bits", True),
    ("energy_kept", None), ("energy_kept", 1.5), ("energy_kept", "all"),
    ("ranks", "true"), ("scaling", True),
])
def test_ere_fields_of_the_wrong_type_or_range_are_refused(lora_dir, tmp_path, field, value):
    path = compress(lora_dir, EreOptions()).save(tmp_path / "e.safetensors")

    def mutate(meta):
        if field == "ranks":
            meta["ere"]["ranks"][0] = True  # a bool is not a rank
        elif value is None:
            del meta["ere"][field]
        else:
            meta["ere"][field] = value
    support.edit_v2_header(path, mutate)
    with pytest.raises(ExpertFileError, match=field.rstrip("s") if field == "ranks" else field):
        load_expert(path)
