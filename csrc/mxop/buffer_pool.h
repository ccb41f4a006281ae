// Host buffers that outlive one call: the tensors a training forward keeps for its backward
// (z is as large as the output) and the scratch of accumulating (kAddTo) outputs.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <utility>
#include <vector>

namespace fusedres {
namespace mxop {

// A state is created per call, so a fresh allocation per call would page-fault (and
// std::vector would also zero it). Freed buffers are kept in a small pool and reused.
class BufferPool {
 public:
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // never destroyed: states may outlive statics
    return *pool;
  }
  void* acquire(size_t bytes, size_t* capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = free_.size();
    for (size_t i = 0; i < free_.size(); ++i)
      if (free_[i].first >= bytes && (best == free_.size() || free_[i].first < free_[best].first))
        best = i;
    if (best < free_.size()) {
      auto b = free_[best];
      free_.erase(free_.begin() + best);
      *capacity = b.first;
      return b.second;
    }
    *capacity = bytes;
    return std::malloc(bytes ? bytes : 1);
  }
  void release(void* p, size_t capacity) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.size() < kMaxFree) {
      free_.emplace_back(capacity, p);
      return;
    }
    // Full: keep the larger of p and the smallest kept buffer, free the other.
    size_t smallest = 0;
    for (size_t i = 1; i < free_.size(); ++i)
      if (free_[i].first < free_[smallest].first) smallest = i;
    if (free_[smallest].first < capacity) {
      std::swap(free_[smallest].second, p);
      std::swap(free_[smallest].first, capacity);
    }
    std::free(p);
  }

 private:
  static constexpr size_t kMaxFree = 16;
  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;
};

class Buffer {
 public:
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { BufferPool::get().release(ptr_, cap_); }
  void reserve(size_t bytes) {
    if (ptr_ != nullptr && cap_ >= bytes) return;
    BufferPool::get().release(ptr_, cap_);
    ptr_ = BufferPool::get().acquire(bytes, &cap_);
  }
  // Room for count values of T (contents unspecified).
  template <typename T>
  T* get(int64_t count) {
    reserve(static_cast<size_t>(count) * sizeof(T));
    return static_cast<T*>(ptr_);
  }
  template <typename T>
  const T* as() const {
    return static_cast<const T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  size_t cap_ = 0;
};

}  // namespace mxop
}  // namespace fusedres
