/*
 * bcryptprimitives.dll for Wine 8.0, which has no such DLL: Rust's standard library for
 * Windows (1.78 and later) imports ProcessPrng from it for its random numbers (HashMap
 * seeds), so without it no Rust program starts under that Wine. ProcessPrng is documented
 * to always succeed; this one fills the buffer from RtlGenRandom (advapi32's
 * SystemFunction036), in chunks, since that takes a 32-bit length.
 *
 * Built by setup.sh (x86_64-w64-mingw32-gcc -shared ... -ladvapi32) into the Wine
 * prefix's system32, where every program of the prefix finds it. Not for real Windows,
 * which has its own.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x10000000 ? 0x10000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk)) {
            /* ProcessPrng cannot fail; neither may a caller that trusts it see garbage. */
            RaiseException(0xC00000E5 /* STATUS_INTERNAL_ERROR */, EXCEPTION_NONCONTINUABLE, 0,
                           NULL);
        }
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
