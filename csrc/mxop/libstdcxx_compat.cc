// This library uses the libstdc++ that libmxnet has loaded: on the oldest systems the wheel
// targets (manylinux2014: CentOS 7, GCC 4.8's libstdc++, GLIBCXX_3.4.19) that one lacks the
// few out-of-line functions the newer headers used here call. They are defined here, hidden,
// so the library needs nothing newer (test_native_ops checks the versions it requires).
// Sized operator delete (CXXABI_1.3.9) is avoided with -fno-sized-deallocation instead.
#include <cstdarg>
#include <cstdio>
#include <new>
#include <sstream>
#include <stdexcept>
#include <string>

// GLIBCXX_3.4.20: std::__throw_out_of_range_fmt, the bounds checks of basic_string and vector.
// Defined by its mangled name: a definition in namespace std would take the visibility of the
// header's declaration (default) and be exported.
extern "C" __attribute__((visibility("hidden"), noreturn)) void _ZSt24__throw_out_of_range_fmtPKcz(
    const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  throw std::out_of_range(std::string(buf));  // the const char* constructor is 3.4.21 too
}

// GLIBCXX_3.4.23: basic_string(const basic_string&, size_type pos, const allocator&) (the old
// ABI's std::string), called by dmlc's headers.
extern "C" __attribute__((visibility("hidden"))) void _ZNSsC1ERKSsmRKSaIcE(
    std::string* self, const std::string& str, std::size_t pos, const std::allocator<char>&) {
  new (self) std::string(str, pos, std::string::npos);
}

// GLIBCXX_3.4.26: ostringstream's default constructor (GCC 4.8 has only the one taking an
// openmode, defaulted), called by dmlc's logging headers where clang does not inline it.
extern "C" __attribute__((visibility("hidden"))) void
_ZNSt19basic_ostringstreamIcSt11char_traitsIcESaIcEEC1Ev(std::ostringstream* self) {
  new (self) std::ostringstream(std::ios_base::out);
}
