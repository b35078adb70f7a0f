"""Loading causal LMs from a local directory and the offline SmolLM2 GGUF; the eot token."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from ttt.bpb import score_document
from ttt.lm import eot_token_id, load_lm


def word_tokenizer(words: list[str], **special: str) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([*words, "[UNK]"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_eot_is_gpt2s_end_of_text(gpt2_tokenizer):
    assert eot_token_id(gpt2_tokenizer) == 50256


def test_eot_falls_back_to_eos_then_known_markers():
    assert eot_token_id(word_tokenizer(["a", "<END>"], eos_token="<END>")) == 1
    assert eot_token_id(word_tokenizer(["a", "b", "</s>"])) == 2
    with pytest.raises(ValueError, match="no eos token"):
        eot_token_id(word_tokenizer(["a", "b"]))


def test_load_from_a_local_directory_in_the_asked_dtype(tmp_path, tiny_gpt2, gpt2_tokenizer):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    gpt2_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_lm(str(tmp_path), dtype="bfloat16", device="cpu")
    assert not loaded.training
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert tokenizer.encode("hello world") == gpt2_tokenizer.encode("hello world")
    as_saved, _ = load_lm(str(tmp_path), device="cpu")
    for (name, p), q in zip(model.named_parameters(), as_saved.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_missing_model_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_lm(str(tmp_path / "nothing.gguf"), device="cpu")
    with pytest.raises(OSError, match="cannot load causal LM"):
        load_lm(str(tmp_path), device="cpu")


@pytest.mark.slow
def test_smollm2_gguf_loads_and_scores_real_text():
    model, tokenizer = load_lm("smollm2-135m", dtype="float32", device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.convert_ids_to_tokens(eot_token_id(tokenizer)) == "<|endoftext|>"
    text = (
        "The city council met on Tuesday to discuss the new budget. Members agreed to spend "
        "more on schools and roads, and the mayor said the plan would be final next month."
    )
    score = score_document(model, tokenizer, text, max_length=64)
    assert score.bytes == len(text.encode()) and score.tokens > 20
    # a real pretrained model: far below a random one's ~log2(49152)/4 bits per byte
    assert 0.4 < score.bits_per_byte < 1.6
    # and it reads its context: the same text just before the document makes it far cheaper
    ids = tokenizer.encode(text, add_special_tokens=False)
    copied = score_document(model, tokenizer, text, max_length=128, context_prefix_ids=ids)
    assert copied.bits_per_byte < 0.75 * score.bits_per_byte


def live_tensor_storages() -> dict[int, int]:
    """Every torch tensor the garbage collector can see: its storage's address and bytes."""
    import gc
    import warnings

    gc.collect()
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch attributes warns
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                try:
                    out[storage.data_ptr()] = storage.nbytes()
                except RuntimeError:  # a fake tensor torch.compile keeps: no memory of its own
                    continue
    return out


@pytest.mark.slow
def test_loading_the_gguf_keeps_no_tensor_beyond_the_models_own():
    # item 10 of issue 21: the dequantized state dict must not outlive the load
    before = set(live_tensor_storages())
    model, _ = load_lm("smollm2-135m", dtype="float32", device="cpu")
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    extra = {k: n for k, n in live_tensor_storages().items() if k not in before | own}
    assert sum(extra.values()) < 1_000_000, f"{len(extra)} tensors alive beyond the model"
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
