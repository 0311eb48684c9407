"""One-shot GPU check: everything adaskip can only verify on an NVIDIA GPU, in one run (< 10 min), one JSON report.

    scripts/gpu_check.sh [REPORT.json]        (or: python scripts/gpu_check.py --report REPORT.json)

Checks (each "passed", "failed" or "skipped" with the reason it could not run here):
  cuda_similarity_kernel  cpp/plugins' CUDA IOSimilarity kernel vs the numpy float64 rule (tests/test_cpp_plugins.py,
                          which builds the library with CMake and calls it through ctypes)
  torch_engine_cuda       the reference torch engine on CUDA vs on CPU: logits and greedy tokens through prefill and
                          decode with online learning (the CPU run's statistics drive both, as adaskip-verify does)
  ort_cuda_ep             the exported ONNX graph on ONNX Runtime's CUDA execution provider vs the CPU reference
  tensorrt_runtime        the TensorRT backend: an engine built by adaskip-build and run by adaskip's TensorRT
                          runtime (IOSimilarity plugin enqueue inside) vs the reference (tests/test_tensorrt.py)
  tensorrt_plugin_cpp     the C++ IPluginV3 built against TensorRT headers (tests/test_cpp_plugins.py)
Exit status: 0 when nothing failed (skips included), 1 when a check failed, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TOL = {"logits": 1e-3, "similarity": 1e-4}  # CUDA vs CPU fp32: TF32 is off below; reductions differ in order
BUDGET_S = 570  # the whole run, so that the report is written inside ten minutes whatever a check does
_deadline = [time.monotonic() + BUDGET_S]


def remaining(cap: float) -> int:
    """Seconds a subprocess may take: its own cap, or what is left of the run's budget (minus room to report)."""
    left = _deadline[0] - time.monotonic() - 15
    if left < 10:
        raise Skip(f"not run: the run's {BUDGET_S} s budget is spent")
    return int(min(cap, left))


class Skip(Exception):
    """A check that cannot run on this machine; the message says why."""


def _cuda() -> tuple[bool, str]:
    import torch

    if not torch.cuda.is_available():
        why = "torch sees no CUDA device (torch.cuda.is_available() is False"
        why += f"; torch {torch.__version__} built without CUDA)" if torch.version.cuda is None else ")"
        return False, why
    return True, torch.cuda.get_device_name(0)


def host_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    smi = shutil.which("nvidia-smi")
    if smi:
        r = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        info["nvidia_smi"] = r.stdout.strip() or r.stderr.strip()
    else:
        info["nvidia_smi"] = "not found"
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["ort_providers"] = ort.get_available_providers()
    except ImportError as e:
        info["onnxruntime"] = f"not importable: {e}"
    try:
        from adaskip.runtime.trt.lib import load_tensorrt

        info["tensorrt"] = load_tensorrt().describe()
    except Exception as e:  # noqa: BLE001 - any failure to load TensorRT is reported, not raised
        info["tensorrt"] = f"not loadable: {e}"
    return info


# -- a small model and plan every check shares --------------------------------------------------------------------

def check_model(work: Path, name: str | None) -> tuple[Any, Any, list[list[int]]]:
    """(model, plan, prompts): `name` (e.g. smollm2-135m) when given, else a tiny random Llama made here (the GPU
    machine may have no model cache and no network). The plan skips 2 sublayers, e2e, online window 3."""
    import torch

    from adaskip.model import load_model
    from adaskip.plan import Calibration, adaskip_plan

    if name is None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        path = work / "tiny-llama"
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, rms_norm_eps=1e-5)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():  # larger than init std so that every layer matters
            for p in hf.parameters():
                p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        hf.save_pretrained(path)
        name = str(path)
    model = load_model(name)
    n = model.spec.num_sublayers
    g = torch.Generator().manual_seed(3)
    calib = Calibration(similarity=torch.rand(n, generator=g).tolist(),
                        norm_ratio=(0.8 + 0.6 * torch.rand(n, generator=g)).tolist(), num_prompts=1,
                        prompt_tokens=16, data_digest="sha256:gpu-check", source="synthetic")
    plan = adaskip_plan(calib, 2, "e2e", model.fingerprint, window=3)
    prompts = torch.randint(0, min(model.spec.vocab_size, 320), (2, 24), generator=g).tolist()
    return model, plan, prompts


# -- the checks ---------------------------------------------------------------------------------------------------

class OnDevice:
    """The torch engine on `device` behind the Engine protocol with host tensors in and out, so that adaskip's own
    comparison (adaskip.eval.verify.compare_engines: one step loop, the reference's statistics feed the policy) can
    hold it against the CPU engine unchanged."""

    def __init__(self, engine_cls: Any, spec: Any, weights: dict, device: str):
        import torch

        self.device, self.spec = torch.device(device), spec
        with self.device:  # factory calls inside the engine (RoPE tables, caches, positions) land on the device
            self.engine = engine_cls(spec, {k: v.to(device, copy=True) for k, v in weights.items()})
        self.dtype = self.engine.dtype

    def new_cache(self, batch: int, capacity: int, cached_layers: list[int]) -> Any:
        with self.device:
            return self.engine.new_cache(batch, capacity, cached_layers)

    def _host(self, out: Any) -> Any:
        from adaskip.runtime.engine import StepOutput

        return StepOutput(*(t.detach().cpu() for t in (out.logits, out.similarity, out.norm_ratio)))

    def prefill(self, ids, valid, cache, skip, scales, all_logits: bool = False, want_stats: bool = True):
        d = self.device
        with d:
            return self._host(self.engine.prefill(ids.to(d), valid.to(d), cache, skip.to(d), scales.to(d),
                                                   all_logits, want_stats))

    def decode(self, tokens, cache, skip, scales, want_stats: bool = True):
        d = self.device
        with d:
            return self._host(self.engine.decode(tokens.to(d), cache, skip.to(d), scales.to(d), want_stats))


def engine_parity(model: Any, plan: Any, prompts: list[list[int]], device: str, decode_steps: int = 8) -> dict:
    """The torch engine on `device` vs on CPU through prefill and decode with online learning: max |logit diff|,
    max statistics diff (where a sublayer ran), greedy-token agreement."""
    from adaskip.eval.verify import compare_engines
    from adaskip.policy import SkipPolicy
    from adaskip.runtime.torch_engine import TorchEngine

    ref = TorchEngine(model.spec, {k: v.clone() for k, v in model.weights.items()})
    cand = OnDevice(TorchEngine, model.spec, model.weights, device)
    report = compare_engines(ref, cand, SkipPolicy(plan), prompts, decode_steps, atol=TOL["logits"])
    ok = (report.passed and report.max_similarity_diff <= TOL["similarity"] and report.token_agreement == 1.0)
    return {"device": device, "prompts": report.prompts, "steps": report.steps,
            "max_logit_diff": report.max_logit_diff, "max_statistics_diff": report.max_similarity_diff,
            "token_agreement": report.token_agreement, "online_ffns": [d["online_ffns"] for d in report.details],
            "tolerance": TOL, "ok": ok}


def check_torch_engine(work: Path, model_name: str | None) -> dict:
    import torch

    ok, why = _cuda()
    if not ok:
        raise Skip(why)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for this comparison
    torch.backends.cudnn.allow_tf32 = False
    model, plan, prompts = check_model(work, model_name)
    result = engine_parity(model, plan, prompts, "cuda")
    result["status"] = "passed" if result.pop("ok") else "failed"
    return result


def check_ort_cuda(work: Path, model_name: str | None) -> dict:
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        raise Skip(f"ONNX Runtime {ort.__version__} has no CUDAExecutionProvider (providers: {', '.join(providers)}; "
                   f"install onnxruntime-gpu)")
    ok, why = _cuda()
    if not ok:
        raise Skip(why)
    from adaskip.eval.verify import compare_engines
    from adaskip.export.onnx.graph import build_onnx
    from adaskip.export.onnx.save import save_onnx
    from adaskip.policy import SkipPolicy
    from adaskip.runtime.ort_engines import OrtPortableEngine
    from adaskip.runtime.torch_engine import TorchEngine

    model, plan, prompts = check_model(work, model_name)
    policy = SkipPolicy(plan)
    out = work / "onnx"
    out.mkdir(exist_ok=True)
    info = save_onnx(build_onnx(model.spec, model.weights, policy.layout, variant="portable"), out)
    engine = OrtPortableEngine(out / info["file"], model.spec)
    # the engine class opens CPU sessions; the same graph on the CUDA provider, fed the same host arrays
    engine.session = ort.InferenceSession(str(out / info["file"]), providers=["CUDAExecutionProvider"])
    used = engine.session.get_providers()
    if used[0] != "CUDAExecutionProvider":
        return {"status": "failed", "reason": f"ONNX Runtime fell back to {used}"}
    report = compare_engines(TorchEngine.from_loaded(model), engine, policy, prompts, 8, atol=TOL["logits"])
    return {"status": "passed" if report.passed and report.token_agreement == 1.0 else "failed",
            "providers": used, "max_logit_diff": report.max_logit_diff,
            "max_statistics_diff": report.max_similarity_diff, "token_agreement": report.token_agreement,
            "steps": report.steps, "tolerance": TOL["logits"]}


def run_pytest(selection: list[str], work: Path, cap: int) -> dict[str, dict]:
    """Run existing GPU tests; per test id: outcome, the skip/failure message, seconds (pytest's JUnit XML)."""
    timeout = remaining(cap)
    xml = work / f"junit-{len(list(work.glob('junit-*.xml')))}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *selection]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # its own process group, so that a timeout also ends the builds it started (cmake, nvcc)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {t.rsplit("::", 1)[-1]: {"outcome": "failed", "message": f"pytest ran past {timeout} s"}
                for t in selection}
    tests = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            outcome, message = "passed", None
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = {"failure": "failed", "error": "failed", "skipped": "skipped"}[tag]
                    message = (node.get("message") or node.text or "").strip()[:500]
            tests[case.get("name")] = {"outcome": outcome, "message": message,
                                       "seconds": float(case.get("time") or 0)}
    for t in selection:  # a test pytest did not report (collection error, crash) is a failure
        tests.setdefault(t.rsplit("::", 1)[-1], {"outcome": "failed",
                                                 "message": f"not run (pytest exit {proc.returncode}): "
                                                            f"{stdout[-800:]}"})
    return tests


def from_tests(tests: dict[str, dict], key: str) -> dict:
    """A check's result from the test that decides it (`key`); the others ride along as context."""
    decisive = tests[key]
    result: dict[str, Any] = {"status": decisive["outcome"], "tests": tests}
    if decisive["outcome"] != "passed":
        result["reason"] = decisive["message"]
    return result


CPP_TESTS = ("test_cuda_kernel_compiled", "test_cuda_matches_numpy", "test_tensorrt_plugin")
_cpp_results: dict[str, dict] = {}


def cpp_tests(work: Path) -> dict[str, dict]:
    """tests/test_cpp_plugins.py's GPU tests, run once (one CMake build) for both checks that read them."""
    if not _cpp_results:
        _cpp_results.update(run_pytest([f"tests/test_cpp_plugins.py::{t}" for t in CPP_TESTS], work, 480))
    return _cpp_results


def check_cuda_kernel(work: Path, _model: str | None) -> dict:
    tests = cpp_tests(work)
    return from_tests({t: tests[t] for t in CPP_TESTS[:2]}, "test_cuda_matches_numpy")


def check_tensorrt_runtime(work: Path, _model: str | None) -> dict:
    try:
        from adaskip.runtime.trt.lib import load_tensorrt

        load_tensorrt()
    except Exception as e:  # noqa: BLE001 - not installed, or a broken install: either way the check cannot run
        raise Skip(f"TensorRT is not importable: {e}") from None
    ok, why = _cuda()
    if not ok:
        raise Skip(why)
    test = "test_tiny_engine_matches_the_reference_on_gpu"
    return from_tests(run_pytest([f"tests/test_tensorrt.py::{test}"], work, 420), test)


def check_tensorrt_plugin_cpp(work: Path, _model: str | None) -> dict:
    return from_tests({"test_tensorrt_plugin": cpp_tests(work)["test_tensorrt_plugin"]}, "test_tensorrt_plugin")


CHECKS: dict[str, Callable[[Path, str | None], dict]] = {  # quick ones first; the C++ build last
    "torch_engine_cuda": check_torch_engine,
    "ort_cuda_ep": check_ort_cuda,
    "tensorrt_runtime": check_tensorrt_runtime,
    "cuda_similarity_kernel": check_cuda_kernel,
    "tensorrt_plugin_cpp": check_tensorrt_plugin_cpp,
}


def run(report_path: Path, model_name: str | None, only: list[str] | None = None, budget: float = BUDGET_S) -> dict:
    t0 = time.time()
    _deadline[0] = time.monotonic() + budget
    report: dict[str, Any] = {"tool": "adaskip scripts/gpu_check.py", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                               time.gmtime()),
                              "host": host_info(), "checks": {}}
    with tempfile.TemporaryDirectory(prefix="adaskip-gpu-check-") as tmp:
        report["budget_s"] = budget
        for name, fn in CHECKS.items():
            if only and name not in only:
                continue
            t = time.time()
            try:
                remaining(BUDGET_S)  # a check that starts after the budget is spent is reported as not run
                result = fn(Path(tmp), model_name)
            except Skip as e:
                result = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - a check that crashes is a failed check, reported with its trace
                result = {"status": "failed", "reason": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.time() - t, 2)
            report["checks"][name] = result
            print(f"gpu_check: {name}: {result['status']}"
                  + (f" ({result['reason']})" if "reason" in result else ""), file=sys.stderr)
    report["summary"] = {s: [n for n, r in report["checks"].items() if r["status"] == s]
                         for s in ("passed", "failed", "skipped")}
    report["seconds"] = round(time.time() - t0, 2)
    report_path.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", default="gpu_check_report.json", help="where to write the JSON report")
    p.add_argument("--model", help="model for the engine checks (e.g. smollm2-135m; default: a tiny random Llama)")
    p.add_argument("--only", nargs="+", choices=tuple(CHECKS), help="run these checks only")
    p.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (report included)")
    a = p.parse_args(argv)
    out = Path(a.report)
    if not out.parent.is_dir():
        print(f"gpu_check: error: {out.parent} is not a directory", file=sys.stderr)
        return 2
    report = run(out, a.model, a.only, a.budget)
    print(f"gpu_check: report written to {out}: {json.dumps(report['summary'])}", file=sys.stderr)
    return 1 if report["summary"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
