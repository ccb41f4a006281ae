// Reading the ops' attributes from NodeAttrs::dict (strings, as MXNet keeps them) and raising
// errors MXNet's Python frontend turns into ValueError/TypeError ("ValueError: <message>").
#pragma once
#include <string>
#include <vector>

#include <mxnet/base.h>
#include <nnvm/node.h>

#include "conv_attrs.h"

namespace fusedres {
namespace mxop {

// Throws dmlc::Error("<kind>: <message>"); kind is "ValueError" or "TypeError".
[[noreturn]] void fail(const char* kind, const std::string& message);

// The conv op's attributes, parsed and checked (check_conv_attrs); momentum rounded through
// float32 as MXNet's BatchNorm holds it.
ConvAttrs parse_conv_attrs(const nnvm::NodeAttrs& attrs);

// Refuses attributes an op does not have (MXNet's own "__...__" ones are ignored).
void check_known_attrs(const nnvm::NodeAttrs& attrs, const std::vector<std::string>& known,
                       const char* op);

std::string shape_str(const mxnet::TShape& s);
const char* dtype_name(int type_flag);

}  // namespace mxop
}  // namespace fusedres
