// Derived weights kept between calls: the inference forward's packed weights with batchnorm
// folded in (engine/forward.h). Folding and packing read every weight in a transposing order,
// which costs a visible share of a deep layer's call (measured 2026-12-02, 2 threads: the
// (16, 512, 32) -> 512 k3 inference took 1.9-2.0 ms with the cache and 2.6-3.1 ms without), and a
// model's weights do not change between inference calls.
//
// A stored result is found again only when every input it was made from holds the same bytes
// as when it was stored, compared in full (a copy of the inputs is kept): a reuse is exact, and
// a changed weight, bias, gamma, beta, running statistic, eps, shape or instruction set misses.
// Entries are keyed by the address of the first input (a layer's weight stays at one address
// between calls). An address is stored from its second call on, so a one-off call pays no copy.
// At most FUSEDRES_PACK_CACHE_MB megabytes (default 256; 0 turns the cache off) of inputs and
// results are kept, the least recently used dropped first. Thread-safe.
//
// Plain functions and structs only: the engine that calls them is compiled once per instruction
// set, so nothing here may be an inline function or template the linker could pick from another
// translation unit (see isa_traits.h).
#pragma once
#include <cstddef>

namespace fusedres {

struct Span {
  const void* p;
  size_t bytes;
};

struct PackCacheLookup {
  const void* data;  // the stored result (result_bytes long), or null
  bool store;        // a miss worth storing: pass the result to pack_cache_store
  void* entry;       // the entry held while data is used; give it to pack_cache_release
};

// The result stored for inputs in[0..n) (in[0].p is the key), if it is result_bytes long.
PackCacheLookup pack_cache_find(const Span* in, int n, size_t result_bytes);
void pack_cache_release(void* entry);
// Stores result (bytes long) for inputs in[0..n), replacing what in[0].p had.
void pack_cache_store(const Span* in, int n, const void* result, size_t bytes);
// Drops every entry (tests; memory).
void pack_cache_clear();
// Entries holding a result, and their bytes (inputs and results).
void pack_cache_stats(size_t* entries, size_t* bytes);

}  // namespace fusedres
