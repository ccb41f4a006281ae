// Registering operators in libmxnet's own NNVM registry from a library built by another g++.
//
// MXNet 1.9.1's PyPI wheels ship libmxnet.so built by GCC 4.8.5 with the old (COW) std::string
// ABI, and export the C++ symbols of the registry. This library is compiled against the
// headers those wheels ship (-D_GLIBCXX_USE_CXX11_ABI=0), so NNVM's and MXNet's types have the
// same layout on both sides, with two exceptions this file deals with:
//
// * std::function's invoker. GCC 4.8's std::function calls its stored invoker with the call's
//   arguments by value; g++ >= 5 passes them by reference. Any std::function that libmxnet
//   calls with a by-value argument (FInferShape's pointers, FCreateOpState's Context, the
//   attribute-map updater's `any*`) would read garbage. Fn<Sig>::make<F>() builds the
//   std::function around a plain function F and, when libmxnet uses the old convention
//   (set_legacy_invoker(true), decided from its .comment section by fusedres/ops/native.py),
//   replaces the invoker with one that takes the arguments by value. The std::function layout
//   (16 bytes of functor, manager pointer, invoker pointer) is the same in both libstdc++s.
// * std::unordered_map grew by 8 bytes after GCC 4.8, so every field of nnvm::NodeAttrs after
//   `dict` (and of nnvm::Node after `attrs`) sits elsewhere in libmxnet. This library reads
//   only NodeAttrs::op, ::name and ::dict (same offsets on both sides) and never builds Nodes:
//   gradient nodes are made by libmxnet's own exported helpers, declared below.
#pragma once
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <nnvm/op.h>
#include <nnvm/node.h>

namespace mxnet {
namespace op {
// Defined (and exported) by libmxnet; declared here only, so calls bind to libmxnet's copies,
// which know its Node layout. Declarations match src/operator/{elemwise_op_common,
// operator_common}.h of MXNet 1.9.1.
struct ElemwiseGradUseInOut {
  const char* op_name;
  std::vector<nnvm::NodeEntry> operator()(const nnvm::ObjectPtr& n,
                                          const std::vector<nnvm::NodeEntry>& ograds) const;
};
std::vector<nnvm::NodeEntry> MakeNonlossGradNode(
    const char* op_name, const nnvm::ObjectPtr& n, const std::vector<nnvm::NodeEntry>& ograds,
    const std::vector<nnvm::NodeEntry>& inputs,
    const std::unordered_map<std::string, std::string>& dict);
}  // namespace op
}  // namespace mxnet

namespace fusedres {
namespace mxop {

// Whether libmxnet's std::function passes invoker arguments by value (GCC < 5).
bool legacy_invoker();
void set_legacy_invoker(bool on);

template <typename Sig>
struct Fn;

template <typename R, typename... A>
struct Fn<R(A...)> {
  // The old convention: arguments by value (a reference argument stays a reference).
  template <R (*F)(A...)>
  static R invoke_by_value(const std::_Any_data&, A... args) {
    return F(std::forward<A>(args)...);
  }

  // std::function<R(A...)> calling F, callable by libmxnet. Only libmxnet calls these.
  template <R (*F)(A...)>
  static std::function<R(A...)> make() {
    std::function<R(A...)> f(F);
    static_assert(sizeof(f) == 4 * sizeof(void*), "unexpected std::function layout");
    if (legacy_invoker()) {
      R (*invoker)(const std::_Any_data&, A...) = &invoke_by_value<F>;
      std::memcpy(reinterpret_cast<char*>(&f) + 3 * sizeof(void*), &invoker, sizeof(invoker));
    }
    return f;
  }
};

// Access to the private members Op::set_attr uses (Op::UpdateAttrMap, Op::index_ and
// OpMap<T>::data_), through the one access-check exemption the language has: member pointers named
// in an explicit template instantiation.
template <typename Tag, typename Tag::type Member>
struct Expose {
  friend typename Tag::type member(Tag) { return Member; }
};
struct OpIndex {
  using type = uint32_t nnvm::Op::*;
  friend type member(OpIndex);
};
struct OpUpdateAttrMap {
  using type = void (*)(const std::string&, std::function<void(dmlc::any*)>);
  friend type member(OpUpdateAttrMap);
};
template <typename T>
struct OpMapData {
  using type = std::vector<std::pair<T, int>> nnvm::OpMap<T>::*;
  friend type member(OpMapData);
};
// For each attribute type set_attr is used with (in one translation unit).
#define FUSEDRES_EXPOSE_OPMAP(T)                                           \
  template struct ::fusedres::mxop::Expose<::fusedres::mxop::OpMapData<T>, \
                                           &::nnvm::OpMap<T>::data_>;

// What Op::set_attr does, with an updater libmxnet can call (see Fn). Registration runs on
// one thread, under libmxnet's registry lock, so the value travels through a static.
struct PendingAttr {
  const nnvm::Op* op;
  const std::string* name;
  const void* value;
};
PendingAttr& pending_attr();

template <typename T>
void update_attr_map(dmlc::any* map) {
  const PendingAttr& p = pending_attr();
  // Every attribute set here is one MXNet's own operators have, so its map exists.
  if (map->empty()) throw dmlc::Error("MXNet has no operator attribute " + *p.name);
  auto& values = nnvm::get<nnvm::OpMap<T>>(*map).*member(OpMapData<T>());
  const uint32_t index = p.op->*member(OpIndex());
  if (values.size() <= index) values.resize(index + 1, std::make_pair(T(), 0));
  values[index] = std::make_pair(*static_cast<const T*>(p.value), 10);
}

template <typename T>
void set_attr(nnvm::Op* op, const std::string& name, const T& value) {
  pending_attr() = PendingAttr{op, &name, &value};
  member(OpUpdateAttrMap())(name, Fn<void(dmlc::any*)>::make<&update_attr_map<T>>());
}

// A new operator in the registry (or the existing one of that name).
inline nnvm::Op* new_op(const char* name) {
  return &::dmlc::Registry<nnvm::Op>::Get()->__REGISTER__(name);
}

// Attribute lookup in NodeAttrs::dict (the only part of NodeAttrs read here).
inline const std::string* find_attr(const nnvm::NodeAttrs& attrs, const char* key) {
  auto it = attrs.dict.find(key);
  return it == attrs.dict.end() ? nullptr : &it->second;
}

}  // namespace mxop
}  // namespace fusedres
