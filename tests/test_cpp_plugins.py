"""cpp/plugins: the native IOSimilarity kernel.

Configures and builds the CMake project once (Release, -j2, cpp/runtime switched off), runs its ctest suite, then
loads the CPU reference through ctypes and checks it against numpy, adaskip.similarity (torch) and the ONNX
function on onnxruntime. Where nvcc exists the CUDA kernel must have been compiled; it runs only on a GPU.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EPS = np.float32(1e-12)
F32, F16, BF16 = 0, 1, 2  # adaskip_dtype
OK, ERR_INVALID, ERR_DTYPE = 0, 1, 2  # adaskip_status
# (batch, tokens, hidden): decode-like, odd sizes, SmolLM2's hidden 576, and long rows.
SHAPES = [(1, 1, 8), (2, 5, 64), (3, 17, 576), (4, 33, 1000), (2, 3, 4096)]


def _nvcc() -> str | None:
    """nvcc where cpp/plugins/CMakeLists.txt looks for it: PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    dirs = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for d in filter(None, dirs):
        if os.access(os.path.join(d, "bin", "nvcc"), os.X_OK):
            return os.path.join(d, "bin", "nvcc")
    return None


def _run(cmd: list[str], cwd: Path | None = None, timeout: int = 600) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> dict:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed: cannot build cpp/plugins")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None or shutil.which(cxx) is None:
        pytest.skip("no C++ compiler (c++/g++/clang++ or $CXX): cannot build cpp/plugins")
    build_dir = tmp_path_factory.mktemp("cpp-plugins-build")
    configure = _run([cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                      "-DADASKIP_BUILD_RUNTIME=OFF", "-DADASKIP_BUILD_ORTOPS=OFF",
                      f"-DCMAKE_CXX_COMPILER={shutil.which(cxx)}"])
    _run([cmake, "--build", build_dir, "-j2"], timeout=900)
    return {"dir": build_dir, "configure_log": configure, "ctest": shutil.which("ctest") or "ctest"}


def _library(build: dict, name: str) -> Path:
    matches = sorted((build["dir"] / "lib").glob(f"lib{name}.*"))
    assert matches, f"lib{name} was not built; lib/ holds {sorted(p.name for p in (build['dir'] / 'lib').glob('*'))}"
    return matches[0]


@pytest.fixture(scope="module")
def cpu_lib(build: dict) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(_library(build, "adaskip_similarity")))
    lib.adaskip_io_similarity_cpu.restype = ctypes.c_int
    lib.adaskip_io_similarity_cpu.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    lib.adaskip_status_string.restype = ctypes.c_char_p
    lib.adaskip_status_string.argtypes = [ctypes.c_int]
    return lib


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def cpu_similarity(lib: ctypes.CDLL, dtype: int, h_in: np.ndarray, h_out: np.ndarray,
                   valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, t, d = h_in.shape
    h_in, h_out = np.ascontiguousarray(h_in), np.ascontiguousarray(h_out)
    valid = np.ascontiguousarray(valid, dtype=np.float32)
    sim, ratio = np.full(b, np.nan, np.float32), np.full(b, np.nan, np.float32)
    status = lib.adaskip_io_similarity_cpu(dtype, _ptr(h_in), _ptr(h_out), _ptr(valid), b, t, d, EPS,
                                           _ptr(sim), _ptr(ratio))
    assert status == OK, lib.adaskip_status_string(status).decode()
    return sim, ratio


def numpy_similarity(h_in: np.ndarray, h_out: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule of adaskip/similarity.py in float64."""
    x, y, w = h_in.astype(np.float64), h_out.astype(np.float64), valid.astype(np.float64)
    dot, n_in, n_out = (x * y).sum(-1), (x * x).sum(-1), (y * y).sum(-1)
    cos = dot / np.maximum(np.sqrt(n_in) * np.sqrt(n_out), float(EPS))
    sim = (cos * w).sum(-1) / np.maximum(w.sum(-1), 1.0)
    ratio = np.sqrt((n_out * w).sum(-1) / np.maximum((n_in * w).sum(-1), float(EPS)))
    return sim, ratio


def random_case(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated residual-stream-like pairs, random masks, a zero h_in token when T > 1, a fully masked row when
    B > 2."""
    rng = np.random.default_rng(seed)
    b, t, _ = shape
    h_in = rng.standard_normal(shape).astype(np.float32)
    h_out = (h_in + 0.7 * rng.standard_normal(shape)).astype(np.float32)
    valid = (rng.random((b, t)) < 0.7).astype(np.float32)
    valid[:, 0] = 1.0
    if t > 1:
        h_in[0, -1] = 0.0  # zero vector: eps keeps its cosine finite (token 0 keeps the row's norm ratio O(1))
    if b > 2:
        valid[-1] = 0.0
    return h_in, h_out, valid


def to_bf16(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 -> (bf16 bit patterns, their float32 values), round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def test_ctest_suite_passes(build: dict) -> None:
    out = _run([build["ctest"], "--output-on-failure", "--timeout", "120"], cwd=build["dir"], timeout=300)
    assert "adaskip_similarity_cpu" in out and "Passed" in out
    assert "tests passed" in out


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_fp32_matches_numpy_and_torch(cpu_lib: ctypes.CDLL, shape: tuple[int, int, int]) -> None:
    import torch

    from adaskip.similarity import io_similarity

    h_in, h_out, valid = random_case(shape, seed=sum(shape))
    sim, ratio = cpu_similarity(cpu_lib, F32, h_in, h_out, valid)
    ref_sim, ref_ratio = numpy_similarity(h_in, h_out, valid)
    assert np.max(np.abs(sim - ref_sim)) <= 1e-6
    assert np.max(np.abs(ratio - ref_ratio)) <= 1e-6
    # The torch definition (float32 arithmetic) agrees to its own rounding.
    t_sim, t_ratio = io_similarity(torch.from_numpy(h_in), torch.from_numpy(h_out), torch.from_numpy(valid) > 0)
    np.testing.assert_allclose(sim, t_sim.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(ratio, t_ratio.numpy(), atol=1e-6, rtol=1e-6)


def test_cpu_fp16_bf16_match_numpy(cpu_lib: ctypes.CDLL) -> None:
    h_in, h_out, valid = random_case((3, 9, 320), seed=7)
    a16, b16 = h_in.astype(np.float16), h_out.astype(np.float16)
    sim, ratio = cpu_similarity(cpu_lib, F16, a16.view(np.uint16), b16.view(np.uint16), valid)
    ref_sim, ref_ratio = numpy_similarity(a16, b16, valid)
    assert np.max(np.abs(sim - ref_sim)) <= 1e-6 and np.max(np.abs(ratio - ref_ratio)) <= 1e-6

    (a_bits, a_vals), (b_bits, b_vals) = to_bf16(h_in), to_bf16(h_out)
    sim, ratio = cpu_similarity(cpu_lib, BF16, a_bits, b_bits, valid)
    ref_sim, ref_ratio = numpy_similarity(a_vals, b_vals, valid)
    assert np.max(np.abs(sim - ref_sim)) <= 1e-6 and np.max(np.abs(ratio - ref_ratio)) <= 1e-6


def test_cpu_matches_onnx_function_on_onnxruntime(cpu_lib: ctypes.CDLL) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from adaskip.export.onnx import similarity_op as so

    node = helper.make_node(so.OP, ["h_in", "h_out", "valid"], ["similarity", "norm_ratio"], domain=so.DOMAIN)
    graph = helper.make_graph(
        [node], "io_similarity",
        [helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["B", "T", "D"]),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["B", "T", "D"]),
         helper.make_tensor_value_info("valid", TensorProto.FLOAT, ["B", "T"])],
        [helper.make_tensor_value_info("similarity", TensorProto.FLOAT, ["B", 1]),
         helper.make_tensor_value_info("norm_ratio", TensorProto.FLOAT, ["B", 1])])
    model = helper.make_model(graph, functions=[so.function_proto()],
                              opset_imports=[helper.make_opsetid("", so.OPSET), so.opset_import()])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for i, shape in enumerate(SHAPES):
        h_in, h_out, valid = random_case(shape, seed=100 + i)
        valid[0, 0] = 0.5  # a fractional weight: both treat valid as a multiplier
        ort_sim, ort_ratio = session.run(None, {"h_in": h_in, "h_out": h_out, "valid": valid})
        assert ort_sim.shape == (shape[0], 1) and ort_ratio.shape == (shape[0], 1)
        sim, ratio = cpu_similarity(cpu_lib, F32, h_in, h_out, valid)
        # ORT computes in float32 (the kernel in float64): they agree to float32 rounding (measured <= 1.2e-7).
        np.testing.assert_allclose(sim, ort_sim[:, 0], atol=1e-6, rtol=0)
        np.testing.assert_allclose(ratio, ort_ratio[:, 0], atol=1e-6, rtol=1e-6)


def test_cpu_rejects_bad_arguments(cpu_lib: ctypes.CDLL) -> None:
    x = np.ones((1, 1, 4), np.float32)
    v = np.ones((1, 1), np.float32)
    out = np.zeros(1, np.float32)
    assert cpu_lib.adaskip_io_similarity_cpu(9, _ptr(x), _ptr(x), _ptr(v), 1, 1, 4, EPS, _ptr(out),
                                             _ptr(out)) == ERR_DTYPE
    assert cpu_lib.adaskip_io_similarity_cpu(F32, None, _ptr(x), _ptr(v), 1, 1, 4, EPS, _ptr(out),
                                             _ptr(out)) == ERR_INVALID
    assert cpu_lib.adaskip_io_similarity_cpu(F32, _ptr(x), _ptr(x), _ptr(v), 1, -1, 4, EPS, _ptr(out),
                                             _ptr(out)) == ERR_INVALID
    assert b"dtype" in cpu_lib.adaskip_status_string(ERR_DTYPE)


@pytest.fixture(scope="module")
def cuda_lib(build: dict) -> ctypes.CDLL:
    if _nvcc() is None:
        pytest.skip("nvcc not found (PATH or /usr/local/cuda/bin): the CUDA kernel is not compiled")
    path = _library(build, "adaskip_similarity_cuda")
    data = path.read_bytes()
    # Compile-only evidence: device code is embedded, built for the configured architectures (ptxas records them).
    assert b".nv_fatbin" in data
    archs = re.search(r"CUDA kernel enabled \(.*, architectures ([^)]*)\)", build["configure_log"])
    assert archs, "CMake did not report the CUDA kernel as enabled although nvcc exists"
    real = [a.split("-")[0] for a in archs.group(1).split(";") if not a.endswith("-virtual")]
    assert real, archs.group(1)
    for arch in real:
        assert f"-arch sm_{arch}".encode() in data, f"no sm_{arch} code in {path.name}"
    lib = ctypes.CDLL(str(path))
    lib.adaskip_io_similarity_cuda_host.restype = ctypes.c_int
    lib.adaskip_io_similarity_cuda_host.argtypes = [
        ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p]
    lib.adaskip_cuda_device_count.restype = ctypes.c_int
    lib.adaskip_cuda_last_error.restype = ctypes.c_char_p
    lib.adaskip_io_similarity_cuda_workspace_bytes.restype = ctypes.c_size_t
    lib.adaskip_io_similarity_cuda_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64]
    return lib


def test_cuda_kernel_compiled(cuda_lib: ctypes.CDLL) -> None:
    assert cuda_lib.adaskip_io_similarity_cuda_workspace_bytes(4, 512) == 4 * 512 * 3 * 4
    assert cuda_lib.adaskip_cuda_device_count() >= 0  # callable without a GPU or driver


def test_cuda_matches_numpy(cuda_lib: ctypes.CDLL) -> None:
    if cuda_lib.adaskip_cuda_device_count() == 0:
        pytest.skip(f"no CUDA device: {cuda_lib.adaskip_cuda_last_error().decode()}")
    for i, shape in enumerate(SHAPES):
        h_in, h_out, valid = random_case(shape, seed=200 + i)
        sim, ratio = np.zeros(shape[0], np.float32), np.zeros(shape[0], np.float32)
        status = cuda_lib.adaskip_io_similarity_cuda_host(F32, F32, _ptr(h_in), _ptr(h_out), _ptr(valid), *shape,
                                                          EPS, _ptr(sim), _ptr(ratio))
        assert status == OK, cuda_lib.adaskip_cuda_last_error().decode()
        ref_sim, ref_ratio = numpy_similarity(h_in, h_out, valid)
        np.testing.assert_allclose(sim, ref_sim, atol=1e-5, rtol=0)
        np.testing.assert_allclose(ratio, ref_ratio, atol=1e-5, rtol=1e-5)


# Parses an ONNX graph holding one ai.adaskip::IOSimilarity node with TensorRT-RTX after loading the C++ plugin
# library, and builds an engine (RTX builds without a GPU). Run in a subprocess: a failing load can abort.
_RTX_PROBE = """
import json, sys
import tensorrt_rtx_bindings as trt
from onnx import TensorProto, helper
logger = trt.Logger(trt.Logger.ERROR)
registry = trt.get_plugin_registry()
assert registry.load_library(sys.argv[1]) is not None, "load_library failed"
result = {"creator": registry.get_creator("IOSimilarity", "1", "") is not None}
for name, dt in (("fp32", TensorProto.FLOAT), ("fp16", TensorProto.FLOAT16)):
    node = helper.make_node("IOSimilarity", ["h_in", "h_out", "valid"], ["sim", "ratio"], domain="ai.adaskip")
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("h_in", dt, ["B", "T", 64]),
        helper.make_tensor_value_info("h_out", dt, ["B", "T", 64]),
        helper.make_tensor_value_info("valid", TensorProto.FLOAT, ["B", "T"])],
        [helper.make_tensor_value_info("sim", dt, None), helper.make_tensor_value_info("ratio", dt, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.adaskip", 1)])
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    entry = {"parsed": ok, "errors": [str(parser.get_error(i)) for i in range(parser.num_errors)]}
    if ok:
        entry["layers"] = [str(network.get_layer(i).type) for i in range(network.num_layers)]
        entry["outputs"] = [[list(network.get_output(i).shape), str(network.get_output(i).dtype)]
                            for i in range(network.num_outputs)]
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for tensor, lo, opt, hi in (("h_in", (1, 1, 64), (2, 16, 64), (4, 128, 64)),
                                    ("h_out", (1, 1, 64), (2, 16, 64), (4, 128, 64)),
                                    ("valid", (1, 1), (2, 16), (4, 128))):
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config)
        entry["engine_bytes"] = 0 if engine is None else engine.nbytes
    result[name] = entry
print("RESULT " + json.dumps(result))
"""


def test_tensorrt_plugin(build: dict, tmp_path: Path) -> None:
    """Only where TensorRT headers exist (TENSORRT_ROOT); our CI has none, so there it is skipped."""
    if "TensorRT plugin enabled" not in build["configure_log"]:
        pytest.skip("TENSORRT_ROOT does not point at TensorRT headers (include/NvInfer.h): the C++ IPluginV3 "
                    "wrapper is not built; no TensorRT headers are obtainable on our CI machines")
    plugin = _library(build, "adaskip_trt_plugins")  # its unit test ran in test_ctest_suite_passes
    rtx = importlib.util.find_spec("tensorrt_rtx_libs")
    if rtx is None or importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        pytest.skip("tensorrt_rtx is not installed: the plugin library was built but not loaded into TensorRT")
    # The ONNX parser's plugin path loads libtensorrt_rtx.so by its unversioned name, which the wheel lacks.
    libdir = Path(rtx.submodule_search_locations[0])
    (tmp_path / "libtensorrt_rtx.so").symlink_to(next(libdir.glob("libtensorrt_rtx.so.*")))
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(tmp_path),
                                                                         os.environ.get("LD_LIBRARY_PATH")])))
    out = subprocess.run([sys.executable, "-c", _RTX_PROBE, str(plugin)], capture_output=True, text=True, env=env,
                         timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["creator"]
    for name, dtype in (("fp32", "DataType.FLOAT"), ("fp16", "DataType.HALF")):
        entry = result[name]
        assert entry["parsed"], entry["errors"]
        assert entry["layers"] == ["LayerType.PLUGIN_V3"]
        assert entry["outputs"] == [[[-1, 1], dtype], [[-1, 1], dtype]]
        assert entry["engine_bytes"] > 0
