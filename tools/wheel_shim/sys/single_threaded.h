/* tools/build_wheel.sh: the MXNet operator library is compiled by zig's clang against glibc
   2.17's headers and libstdc++'s headers. libstdc++ (GCC >= 11) includes this glibc 2.32 header
   when it exists and reads __libc_single_threaded from it; zig's copy of it refuses older
   glibc targets. This stand-in, found first, makes the flag a constant 0 ("threads may
   exist"): libstdc++ then always takes its atomic path, which is what glibc 2.17 systems get. */
#pragma once
static char __libc_single_threaded = 0;
