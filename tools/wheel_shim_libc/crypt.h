/* tools/build_wheel.sh: searched last (-idirafter) by every compile of the wheels. Python 3.8's
   Python.h includes <crypt.h> when the interpreter was built where it existed (HAVE_CRYPT_H),
   and zig's glibc headers have none (libcrypt's header ships with libxcrypt on current systems).
   This declares the two functions glibc's <crypt.h> did; fusedres calls neither. */
#pragma once
#ifdef __cplusplus
extern "C" {
#endif
char *crypt(const char *phrase, const char *setting);
struct crypt_data;
char *crypt_r(const char *phrase, const char *setting, struct crypt_data *data);
#ifdef __cplusplus
}
#endif
