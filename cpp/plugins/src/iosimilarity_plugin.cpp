// TensorRT IPluginV3 wrapper of the CUDA IOSimilarity kernel (see include/adaskip/iosimilarity_plugin.h).
//
// Every TensorRT entry point is noexcept: failures are reported as non-zero status / nullptr and a log line through
// the ILoggerFinder TensorRT hands to the library (nothing is logged when the plugin is linked in directly).
#include "adaskip/iosimilarity_plugin.h"

#include <atomic>
#include <cmath>
#include <cstring>
#include <exception>
#include <string>

#include "adaskip/similarity_cuda.h"

namespace adaskip {
namespace {

using nvinfer1::DataType;
using nvinfer1::TensorFormat;

constexpr int32_t kNbInputs = 3;   // h_in, h_out, valid
constexpr int32_t kNbOutputs = 2;  // similarity, norm_ratio
constexpr char const* kEpsField = "eps";

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept {
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    if (finder == nullptr) return;
    if (nvinfer1::ILogger* logger = finder->findLogger()) {
        logger->log(severity, ("IOSimilarity plugin: " + message).c_str());
    }
}

void logError(std::string const& message) noexcept { logMessage(nvinfer1::ILogger::Severity::kERROR, message); }

bool isFloatType(DataType type) noexcept {
    return type == DataType::kFLOAT || type == DataType::kHALF || type == DataType::kBF16;
}

int toAdaskipDtype(DataType type) noexcept {
    switch (type) {
        case DataType::kFLOAT: return ADASKIP_DTYPE_F32;
        case DataType::kHALF: return ADASKIP_DTYPE_F16;
        case DataType::kBF16: return ADASKIP_DTYPE_BF16;
        default: return -1;
    }
}

bool sameDims(nvinfer1::Dims const& a, nvinfer1::Dims const& b) noexcept {
    if (a.nbDims != b.nbDims) return false;
    for (int32_t i = 0; i < a.nbDims; ++i) {
        if (a.d[i] != b.d[i]) return false;
    }
    return true;
}

// Ranks and agreeing extents: h_in and h_out [B,T,D], valid [B,T]. -1 (a wildcard at build time) matches anything.
bool shapesAgree(nvinfer1::Dims const& h_in, nvinfer1::Dims const& h_out, nvinfer1::Dims const& valid) noexcept {
    if (h_in.nbDims != 3 || h_out.nbDims != 3 || valid.nbDims != 2) return false;
    auto agree = [](int64_t a, int64_t b) { return a < 0 || b < 0 || a == b; };
    for (int32_t i = 0; i < 3; ++i) {
        if (!agree(h_in.d[i], h_out.d[i])) return false;
    }
    return agree(h_in.d[0], valid.d[0]) && agree(h_in.d[1], valid.d[1]);
}

bool validEps(float eps) noexcept { return std::isfinite(eps) && eps >= 0.0f; }

}  // namespace

// ---------------------------------------------------------------- plugin

IOSimilarityPlugin::IOSimilarityPlugin(float eps) noexcept : mEps(eps) {}

IOSimilarityPlugin::IOSimilarityPlugin(IOSimilarityPlugin const& other) noexcept
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      mEps(other.mEps) {}  // mFields / mFieldCollection point into `other`: left empty, rebuilt on demand

nvinfer1::IPluginCapability* IOSimilarityPlugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
    switch (type) {
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

nvinfer1::IPluginV3* IOSimilarityPlugin::clone() noexcept {
    try {
        return new IOSimilarityPlugin(*this);
    } catch (std::exception const& e) {
        logError(std::string("clone failed: ") + e.what());
        return nullptr;
    }
}

char const* IOSimilarityPlugin::getPluginName() const noexcept { return kIOSimilarityPluginName; }
char const* IOSimilarityPlugin::getPluginVersion() const noexcept { return kIOSimilarityPluginVersion; }
char const* IOSimilarityPlugin::getPluginNamespace() const noexcept { return kIOSimilarityPluginNamespace; }

int32_t IOSimilarityPlugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        logError("expects 3 inputs (h_in, h_out, valid) and 2 outputs (similarity, norm_ratio)");
        return 1;
    }
    if (!shapesAgree(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims)) {
        logError("expects h_in and h_out of one shape [B,T,D] and valid of shape [B,T]");
        return 1;
    }
    return 0;
}

int32_t IOSimilarityPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                               int32_t nbInputs) const noexcept {
    if (outputTypes == nullptr || inputTypes == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        return 1;
    }
    if (!isFloatType(inputTypes[0])) {
        logError("h_in must be float32, float16 or bfloat16");
        return 1;
    }
    // Like the ONNX function: the outputs have the type of the hidden states.
    outputTypes[0] = inputTypes[0];
    outputTypes[1] = inputTypes[0];
    return 0;
}

int32_t IOSimilarityPlugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                                            nvinfer1::DimsExprs const* /*shapeInputs*/, int32_t nbShapeInputs,
                                            nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                            nvinfer1::IExprBuilder& exprBuilder) noexcept {
    if (inputs == nullptr || outputs == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs ||
        nbShapeInputs != 0) {
        return 1;
    }
    if (inputs[0].nbDims != 3 || inputs[1].nbDims != 3 || inputs[2].nbDims != 2) {
        logError("expects h_in [B,T,D], h_out [B,T,D], valid [B,T]");
        return 1;
    }
    nvinfer1::IDimensionExpr const* one = exprBuilder.constant(1);
    for (int32_t i = 0; i < kNbOutputs; ++i) {
        outputs[i].nbDims = 2;
        outputs[i].d[0] = inputs[0].d[0];  // B
        outputs[i].d[1] = one;
    }
    return 0;
}

bool IOSimilarityPlugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                                   int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (inOut == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 ||
        pos >= kNbInputs + kNbOutputs) {
        return false;
    }
    nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR) return false;
    // Decide from inOut[0..pos] only (TensorRT fills the rest later).
    switch (pos) {
        case 0: return isFloatType(desc.type);
        case 2: return desc.type == DataType::kFLOAT || desc.type == inOut[0].desc.type;
        default: return desc.type == inOut[0].desc.type;  // h_out and both outputs
    }
}

int32_t IOSimilarityPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

size_t IOSimilarityPlugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                            nvinfer1::DynamicPluginTensorDesc const* /*outputs*/,
                                            int32_t /*nbOutputs*/) const noexcept {
    if (inputs == nullptr || nbInputs != kNbInputs || inputs[0].max.nbDims != 3) return 0;
    // Sized for the profile's largest [B,T]; smaller runtime shapes use a prefix of it.
    return adaskip_io_similarity_cuda_workspace_bytes(inputs[0].max.d[0], inputs[0].max.d[1]);
}

int32_t IOSimilarityPlugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                                          nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept {
    if (in == nullptr || out == nullptr || nbInputs != kNbInputs || nbOutputs != kNbOutputs) return 1;
    nvinfer1::Dims const& h = in[0].dims;
    if (h.nbDims != 3 || !sameDims(h, in[1].dims) || in[2].dims.nbDims != 2 || in[2].dims.d[0] != h.d[0] ||
        in[2].dims.d[1] != h.d[1]) {
        logError("runtime shapes disagree: expects h_in and h_out [B,T,D] and valid [B,T]");
        return 1;
    }
    if (in[1].type != in[0].type || toAdaskipDtype(in[0].type) < 0 || toAdaskipDtype(in[2].type) < 0) {
        logError("unsupported input types");
        return 1;
    }
    return 0;
}

int32_t IOSimilarityPlugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc,
                                    nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs,
                                    void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) return 1;
    nvinfer1::Dims const& h = inputDesc[0].dims;
    if (h.nbDims != 3) return 1;
    const int dtype = toAdaskipDtype(inputDesc[0].type);
    const int valid_dtype = toAdaskipDtype(inputDesc[2].type);
    if (dtype < 0 || valid_dtype < 0 || outputDesc[0].type != inputDesc[0].type ||
        outputDesc[1].type != inputDesc[0].type) {
        logError("unsupported tensor types in enqueue");
        return 1;
    }
    const int status =
        adaskip_io_similarity_cuda(dtype, valid_dtype, inputs[0], inputs[1], inputs[2], h.d[0], h.d[1], h.d[2], mEps,
                                   outputs[0], outputs[1], workspace, stream);
    if (status != ADASKIP_OK) {
        std::string message = std::string("enqueue failed: ") + adaskip_status_string(status);
        if (status == ADASKIP_ERR_CUDA) message += std::string(": ") + adaskip_cuda_last_error();
        logError(message);
        return 1;
    }
    return 0;
}

nvinfer1::IPluginV3* IOSimilarityPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept {
    return clone();  // no per-context resources
}

nvinfer1::PluginFieldCollection const* IOSimilarityPlugin::getFieldsToSerialize() noexcept {
    try {
        mFields.clear();
        mFields.emplace_back(kEpsField, &mEps, nvinfer1::PluginFieldType::kFLOAT32, 1);
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
        return &mFieldCollection;
    } catch (std::exception const& e) {
        logError(std::string("getFieldsToSerialize failed: ") + e.what());
        return nullptr;
    }
}

// ---------------------------------------------------------------- creator

IOSimilarityPluginCreator::IOSimilarityPluginCreator() noexcept {
    // No advertised fields: the ONNX op has no attributes, and an advertised "eps" would make the ONNX parser warn
    // on every node that lacks it. createPlugin still reads an optional "eps" (serialized engines carry it).
    mFieldNameCollection.nbFields = 0;
    mFieldNameCollection.fields = nullptr;
}

char const* IOSimilarityPluginCreator::getPluginName() const noexcept { return kIOSimilarityPluginName; }
char const* IOSimilarityPluginCreator::getPluginVersion() const noexcept { return kIOSimilarityPluginVersion; }
char const* IOSimilarityPluginCreator::getPluginNamespace() const noexcept { return kIOSimilarityPluginNamespace; }

nvinfer1::PluginFieldCollection const* IOSimilarityPluginCreator::getFieldNames() noexcept {
    return &mFieldNameCollection;
}

nvinfer1::IPluginV3* IOSimilarityPluginCreator::createPlugin(char const* /*name*/,
                                                             nvinfer1::PluginFieldCollection const* fc,
                                                             nvinfer1::TensorRTPhase /*phase*/) noexcept {
    try {
        float eps = ADASKIP_SIMILARITY_EPS;
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
            nvinfer1::PluginField const& field = fc->fields[i];
            if (field.name == nullptr || std::strcmp(field.name, kEpsField) != 0) {
                // Fields this version does not know (e.g. from a newer serializer) do not change the math.
                logMessage(nvinfer1::ILogger::Severity::kWARNING,
                    std::string("ignoring unknown field '") + (field.name ? field.name : "") + "'");
                continue;
            }
            if (field.data == nullptr || field.length != 1) {
                logError("field 'eps' must hold exactly one value");
                return nullptr;
            }
            if (field.type == nvinfer1::PluginFieldType::kFLOAT32) {
                std::memcpy(&eps, field.data, sizeof eps);
            } else if (field.type == nvinfer1::PluginFieldType::kFLOAT64) {
                double value;
                std::memcpy(&value, field.data, sizeof value);
                eps = static_cast<float>(value);
            } else {
                logError("field 'eps' must be float32 or float64");
                return nullptr;
            }
        }
        if (!validEps(eps)) {
            logError("field 'eps' must be finite and >= 0");
            return nullptr;
        }
        return new IOSimilarityPlugin(eps);
    } catch (std::exception const& e) {
        logError(std::string("createPlugin failed: ") + e.what());
        return nullptr;
    }
}

IOSimilarityPluginCreator* ioSimilarityCreator() noexcept {
    static IOSimilarityPluginCreator creator;
    return &creator;
}

}  // namespace adaskip

extern "C" {

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    static nvinfer1::IPluginCreatorInterface* const creators[] = {adaskip::ioSimilarityCreator()};
    nbCreators = static_cast<int32_t>(sizeof creators / sizeof creators[0]);
    return creators;
}

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { adaskip::gLoggerFinder.store(finder); }

}  // extern "C"
