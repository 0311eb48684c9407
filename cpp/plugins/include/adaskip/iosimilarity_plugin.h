// TensorRT IPluginV3 wrapper of the CUDA IOSimilarity kernel.
//
// Plugin "IOSimilarity", version "1", namespace "" — the ONNX node ai.adaskip::IOSimilarity resolves to it by name
// (the ONNX parser looks custom ops up in the plugin registry), and the Python-side plugin in adaskip/runtime/trt/plugin.py
// registers the same triple, so an engine built with either deserializes with either.
//
//   inputs : h_in [B,T,D], h_out [B,T,D] (fp32 | fp16 | bf16, same type), valid [B,T] (fp32 or the input type)
//   outputs: similarity [B,1], norm_ratio [B,1] (the input type, like the ONNX function)
//   fields : eps (float32, default 1e-12): serialized with the engine and accepted by createPlugin, but not
//            advertised in getFieldNames (the ONNX op has no attributes, so the parser would warn about it)
//
// Loading: IPluginRegistry::loadLibrary / trtexec --dynamicPlugins with the shared library (it exports
// getCreators and setLoggerFinder), or registerCreator(*adaskip::ioSimilarityCreator(), "") when linked in.
#ifndef ADASKIP_IOSIMILARITY_PLUGIN_H
#define ADASKIP_IOSIMILARITY_PLUGIN_H

#include <NvInfer.h>

#include <cstdint>
#include <vector>

#include "adaskip/similarity.h"

namespace adaskip {

constexpr char const* kIOSimilarityPluginName = "IOSimilarity";
constexpr char const* kIOSimilarityPluginVersion = "1";
constexpr char const* kIOSimilarityPluginNamespace = "";

class ADASKIP_SIM_API IOSimilarityPlugin final : public nvinfer1::IPluginV3,
                                 public nvinfer1::IPluginV3OneCore,
                                 public nvinfer1::IPluginV3OneBuild,
                                 public nvinfer1::IPluginV3OneRuntime {
public:
    explicit IOSimilarityPlugin(float eps = ADASKIP_SIMILARITY_EPS) noexcept;
    IOSimilarityPlugin(IOSimilarityPlugin const& other) noexcept;
    IOSimilarityPlugin& operator=(IOSimilarityPlugin const&) = delete;
    ~IOSimilarityPlugin() noexcept override = default;

    float eps() const noexcept { return mEps; }

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                               nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                            int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                            nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                   int32_t nbOutputs) noexcept override;
    int32_t getNbOutputs() const noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                            nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                          int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                    void const* const* inputs, void* const* outputs, void* workspace,
                    cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    float mEps;
    // Backing store of getFieldsToSerialize(); points into this object, so it is rebuilt, never copied.
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class ADASKIP_SIM_API IOSimilarityPluginCreator final : public nvinfer1::IPluginCreatorV3One {
public:
    IOSimilarityPluginCreator() noexcept;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    // Build phase: fields from the network (ONNX attributes named in getFieldNames). Runtime phase: the fields of
    // getFieldsToSerialize(). Returns nullptr on a malformed field (logged through the logger finder, if any).
    nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                      nvinfer1::TensorRTPhase phase) noexcept override;

private:
    nvinfer1::PluginFieldCollection mFieldNameCollection{};
};

// The process-wide creator, for IPluginRegistry::registerCreator when the plugin is linked into an application.
ADASKIP_SIM_API IOSimilarityPluginCreator* ioSimilarityCreator() noexcept;

}  // namespace adaskip

// Entry points TensorRT looks up when it loads a plugin library (IPluginRegistry::loadLibrary, trtexec).
extern "C" {
ADASKIP_SIM_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
ADASKIP_SIM_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
}

#endif  // ADASKIP_IOSIMILARITY_PLUGIN_H
