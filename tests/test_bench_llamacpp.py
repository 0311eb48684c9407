"""adaskip-bench's llama.cpp anchor (adaskip/eval/llamacpp.py): what it needs, what it fetches, and, where
llama-cpp-python is installed, that it runs the same weights on the same prompt ids as our engines."""

from __future__ import annotations

import pytest

from adaskip.eval import llamacpp
from conftest import long_text

MISSING = llamacpp.unavailable()


def test_a_missing_llama_cpp_is_a_reason_not_a_failure(monkeypatch):
    monkeypatch.setattr(llamacpp.importlib.util, "find_spec", lambda name: None)
    assert "llama-cpp-python is not installed" in llamacpp.unavailable()
    assert "adaskip[llamacpp]" in llamacpp.unavailable()


def test_only_the_converter_is_taken_from_the_sdist():
    root = "llama_cpp_python-0.3.36/vendor/llama.cpp"
    assert llamacpp._converter_member(f"{root}/convert_hf_to_gguf.py")
    assert llamacpp._converter_member(f"{root}/conversion/llama.py")
    assert llamacpp._converter_member(f"{root}/gguf-py/gguf/gguf_writer.py")
    assert llamacpp._converter_member(f"{root}/LICENSE")
    assert not llamacpp._converter_member(f"{root}/ggml/src/ggml.c")
    assert not llamacpp._converter_member("llama_cpp_python-0.3.36/llama_cpp/llama.py")


def test_the_worker_runs_without_the_passive_wait_policy(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    env = llamacpp._worker_env()
    assert "OMP_WAIT_POLICY" not in env and env["PATH"]


def test_a_model_file_is_refused_before_converting(tmp_path):
    from adaskip.errors import InputError

    with pytest.raises(InputError, match="convert a Hugging Face directory"):
        llamacpp.make_ggufs(str(tmp_path), ["f32"], tmp_path, tmp_path / "convert.py", 1)


@pytest.mark.skipif(MISSING is not None, reason=f"llama.cpp anchor not runnable here: {MISSING}")
def test_llama_cpp_f32_runs_the_same_weights_as_ours(smollm2_dir, smollm2_hf, smollm2_tokenizer, tmp_path):
    """The f32 GGUF converted from SmolLM2's directory continues a real prompt with the same greedy tokens as the
    transformers model (llama.cpp keeps an f16 KV cache: a few tokens, not a long run), timed in its worker."""
    import torch

    prompt = smollm2_tokenizer.encode(long_text()[:600])[:96]
    gguf = llamacpp.make_ggufs(str(smollm2_dir), ["f32"], tmp_path, llamacpp.converter(), 2)["f32"]
    worker = llamacpp.Worker(gguf, 2, 256)
    try:
        r = worker.request(prompt, 5)
    finally:
        worker.close()
    assert worker.proc.returncode == 0 and r["ttft"] > 0 and r["decode"] > 0
    assert worker.info["omp_wait_policy"].startswith("(unset") and worker.info["llama_cpp_python"]
    with torch.no_grad():
        ref = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
    assert r["tokens"] == ref.tolist()
