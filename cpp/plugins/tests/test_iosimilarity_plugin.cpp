// The TensorRT IPluginV3 wrapper's build-time logic, without a GPU and without libnvinfer: creator metadata and
// fields, serialization round trip, capability interfaces, clone, type/format negotiation, shape checks, workspace
// size and the library entry points. (getOutputShapes needs TensorRT's own IExprBuilder; enqueue needs a GPU.)
#include <cstring>
#include <memory>

#include "adaskip/iosimilarity_plugin.h"
#include "adaskip/similarity_cuda.h"
#include "check.h"

namespace {

using nvinfer1::DataType;
using nvinfer1::TensorFormat;

nvinfer1::Dims dims(std::initializer_list<int64_t> values) {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int32_t i = 0;
    for (int64_t v : values) d.d[i++] = v;
    return d;
}

nvinfer1::DynamicPluginTensorDesc desc(DataType type, nvinfer1::Dims d, TensorFormat format = TensorFormat::kLINEAR) {
    nvinfer1::DynamicPluginTensorDesc t{};
    t.desc.dims = d;
    t.desc.type = type;
    t.desc.format = format;
    t.min = t.opt = t.max = d;
    return t;
}

std::unique_ptr<nvinfer1::IPluginV3> create(nvinfer1::PluginFieldCollection const* fc) {
    return std::unique_ptr<nvinfer1::IPluginV3>(
        adaskip::ioSimilarityCreator()->createPlugin("sim", fc, nvinfer1::TensorRTPhase::kBUILD));
}

void testCreatorAndEntryPoints() {
    auto* creator = adaskip::ioSimilarityCreator();
    CHECK(std::strcmp(creator->getPluginName(), "IOSimilarity") == 0);
    CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
    CHECK(std::strcmp(creator->getPluginNamespace(), "") == 0);
    CHECK(std::strcmp(creator->getInterfaceInfo().kind, "PLUGIN CREATOR_V3ONE") == 0);
    auto const* names = creator->getFieldNames();
    CHECK(names != nullptr && names->nbFields == 0);  // nothing the ONNX parser must find on the node

    int32_t n = 0;
    nvinfer1::IPluginCreatorInterface* const* list = getCreators(n);
    CHECK(n == 1 && list[0] == creator);
}

void testFieldsRoundTrip() {
    const float eps = 1e-6f;
    nvinfer1::PluginField field("eps", &eps, nvinfer1::PluginFieldType::kFLOAT32, 1);
    nvinfer1::PluginFieldCollection fc{1, &field};
    auto plugin = create(&fc);
    CHECK(plugin != nullptr);
    if (!plugin) return;
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    auto const* serialized = runtime->getFieldsToSerialize();
    CHECK(serialized->nbFields == 1 && std::strcmp(serialized->fields[0].name, "eps") == 0);
    // What the engine stores comes back through the creator in the runtime phase.
    std::unique_ptr<nvinfer1::IPluginV3> restored(
        adaskip::ioSimilarityCreator()->createPlugin("sim", serialized, nvinfer1::TensorRTPhase::kRUNTIME));
    CHECK(restored && static_cast<adaskip::IOSimilarityPlugin*>(restored.get())->eps() == eps);

    const double eps64 = 1e-3;
    nvinfer1::PluginField f64("eps", &eps64, nvinfer1::PluginFieldType::kFLOAT64, 1);
    nvinfer1::PluginFieldCollection fc64{1, &f64};
    auto p64 = create(&fc64);
    CHECK(p64 && static_cast<adaskip::IOSimilarityPlugin*>(p64.get())->eps() == 1e-3f);

    auto defaults = create(nullptr);  // the ONNX node carries no attribute: default eps
    CHECK(defaults && static_cast<adaskip::IOSimilarityPlugin*>(defaults.get())->eps() == ADASKIP_SIMILARITY_EPS);

    const int32_t bad_type = 3;
    nvinfer1::PluginField wrong("eps", &bad_type, nvinfer1::PluginFieldType::kINT32, 1);
    nvinfer1::PluginFieldCollection fc_wrong{1, &wrong};
    CHECK(create(&fc_wrong) == nullptr);
    const float negative = -1.0f;
    nvinfer1::PluginField neg("eps", &negative, nvinfer1::PluginFieldType::kFLOAT32, 1);
    nvinfer1::PluginFieldCollection fc_neg{1, &neg};
    CHECK(create(&fc_neg) == nullptr);
}

void testCapabilitiesAndClone() {
    auto plugin = create(nullptr);
    CHECK(plugin != nullptr);
    if (!plugin) return;
    auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
    auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
        plugin->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    CHECK(core && build && runtime);
    CHECK(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
    CHECK(std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
    CHECK(std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
    CHECK(std::strcmp(core->getPluginName(), "IOSimilarity") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0);
    CHECK(build->getNbOutputs() == 2);

    std::unique_ptr<nvinfer1::IPluginV3> copy(plugin->clone());
    CHECK(copy != nullptr && copy.get() != plugin.get());
    std::unique_ptr<nvinfer1::IPluginV3> attached(runtime->attachToContext(nullptr));
    CHECK(attached != nullptr);
    // A clone serializes its own fields, not pointers into the original.
    auto* copy_runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
        copy->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
    CHECK(copy_runtime->getFieldsToSerialize()->nbFields == 1);
    plugin.reset();
    CHECK(*static_cast<float const*>(copy_runtime->getFieldsToSerialize()->fields[0].data) == ADASKIP_SIMILARITY_EPS);
}

void testTypesAndFormats() {
    adaskip::IOSimilarityPlugin plugin;
    for (DataType t : {DataType::kFLOAT, DataType::kHALF, DataType::kBF16}) {
        DataType in[3] = {t, t, DataType::kFLOAT}, out[2] = {DataType::kINT32, DataType::kINT32};
        CHECK(plugin.getOutputDataTypes(out, 2, in, 3) == 0 && out[0] == t && out[1] == t);
    }
    DataType bad_in[3] = {DataType::kINT32, DataType::kINT32, DataType::kFLOAT}, out[2];
    CHECK(plugin.getOutputDataTypes(out, 2, bad_in, 3) != 0);

    const auto h = dims({2, 7, 64}), v = dims({2, 7}), o = dims({2, 1});
    nvinfer1::DynamicPluginTensorDesc io[5] = {desc(DataType::kHALF, h), desc(DataType::kHALF, h),
                                               desc(DataType::kFLOAT, v), desc(DataType::kHALF, o),
                                               desc(DataType::kHALF, o)};
    for (int pos = 0; pos < 5; ++pos) CHECK(plugin.supportsFormatCombination(pos, io, 3, 2));
    io[2].desc.type = DataType::kHALF;  // valid in the input type (the ONNX function's typing) is accepted too
    CHECK(plugin.supportsFormatCombination(2, io, 3, 2));
    io[2].desc.type = DataType::kBF16;  // but not a third type
    CHECK(!plugin.supportsFormatCombination(2, io, 3, 2));
    io[1].desc.type = DataType::kFLOAT;  // h_out must match h_in
    CHECK(!plugin.supportsFormatCombination(1, io, 3, 2));
    io[1].desc.type = DataType::kHALF;
    io[3].desc.type = DataType::kFLOAT;  // outputs have the input type
    CHECK(!plugin.supportsFormatCombination(3, io, 3, 2));
    io[0].desc.format = TensorFormat::kCHW32;
    CHECK(!plugin.supportsFormatCombination(0, io, 3, 2));
    io[0].desc.format = TensorFormat::kLINEAR;
    io[0].desc.type = DataType::kINT8;
    CHECK(!plugin.supportsFormatCombination(0, io, 3, 2));
}

void testShapesAndWorkspace() {
    adaskip::IOSimilarityPlugin plugin;
    const auto h = dims({-1, -1, 64}), v = dims({-1, -1}), o = dims({-1, 1});
    nvinfer1::DynamicPluginTensorDesc in[3] = {desc(DataType::kFLOAT, h), desc(DataType::kFLOAT, h),
                                               desc(DataType::kFLOAT, v)};
    nvinfer1::DynamicPluginTensorDesc out[2] = {desc(DataType::kFLOAT, o), desc(DataType::kFLOAT, o)};
    in[0].max = in[1].max = dims({4, 512, 64});
    in[2].max = dims({4, 512});
    CHECK(plugin.configurePlugin(in, 3, out, 2) == 0);
    CHECK(plugin.getWorkspaceSize(in, 3, out, 2) == adaskip_io_similarity_cuda_workspace_bytes(4, 512));
    CHECK(plugin.getWorkspaceSize(in, 3, out, 2) >= 4 * 512 * 3 * sizeof(float));
    in[2].desc.dims = dims({-1, -1, 1});
    CHECK(plugin.configurePlugin(in, 3, out, 2) != 0);
    CHECK(plugin.configurePlugin(in, 2, out, 2) != 0);

    nvinfer1::PluginTensorDesc rin[3] = {in[0].desc, in[1].desc, in[2].desc}, rout[2] = {out[0].desc, out[1].desc};
    rin[0].dims = rin[1].dims = dims({2, 9, 64});
    rin[2].dims = dims({2, 9});
    rout[0].dims = rout[1].dims = dims({2, 1});
    CHECK(plugin.onShapeChange(rin, 3, rout, 2) == 0);
    rin[2].dims = dims({2, 8});
    CHECK(plugin.onShapeChange(rin, 3, rout, 2) != 0);
    rin[2].dims = dims({2, 9});
    rin[1].dims = dims({2, 9, 65});
    CHECK(plugin.onShapeChange(rin, 3, rout, 2) != 0);
}

}  // namespace

int main() {
    testCreatorAndEntryPoints();
    testFieldsRoundTrip();
    testCapabilitiesAndClone();
    testTypesAndFormats();
    testShapesAndWorkspace();
    return adaskip_test::finish("test_iosimilarity_plugin");
}
