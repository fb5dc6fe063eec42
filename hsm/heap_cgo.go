package hsm

/*
#include <stdlib.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
static long long bp_c_heap_in_use(void) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
	struct mallinfo2 mi = mallinfo2();
	return (long long)(mi.uordblks + mi.hblkhd);
#else
	return -1;
#endif
}
*/
import "C"

// CHeapInUse is the number of bytes the process's C allocator has handed
// out and not had back (glibc's mallinfo2, every arena: small blocks and
// mmapped ones). The token libraries' objects live there, the Go heap does
// not: a count that grows by a few hundred bytes per token operation is
// SoftHSM2 keeping the session objects it destroyed
// (KeepsDestroyedObjects). ok is false where the C library cannot say.
// It locks every malloc arena for a moment: for tests and diagnostics,
// not for a hot path.
func CHeapInUse() (n int64, ok bool) {
	v := int64(C.bp_c_heap_in_use())
	return v, v >= 0
}
