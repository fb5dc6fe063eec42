package hsm

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>

typedef unsigned long bp_ulong;

// CK_MECHANISM, natural alignment (PKCS#11 packs structures only on
// Windows).
typedef struct {
	bp_ulong mechanism;
	void *pParameter;
	bp_ulong ulParameterLen;
} bp_mechanism;

// CK_FUNCTION_LIST is a CK_VERSION (two bytes) followed by the function
// pointers in the order the standard fixes; C_WrapKey is entry 60 (the
// same in v2.20, v2.40 and the 2.x-compatible head of v3.0).
typedef struct {
	unsigned char version[2];
	void *fn[61];
} bp_function_list;

enum { bp_fn_wrap_key = 60 };

typedef bp_ulong (*bp_get_function_list_fn)(void **);
typedef bp_ulong (*bp_wrap_key_fn)(bp_ulong, bp_mechanism *, bp_ulong, bp_ulong, unsigned char *, bp_ulong *);

// bp_function_list_of returns the CK_FUNCTION_LIST of a module that this
// process has already loaded (RTLD_NOLOAD: never loads a second copy), or
// NULL. The same library instance means the same sessions and objects.
static void *bp_function_list_of(const char *path) {
	void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
	if (h == NULL) {
		return NULL;
	}
	bp_get_function_list_fn get = (bp_get_function_list_fn)dlsym(h, "C_GetFunctionList");
	void *list = NULL;
	if (get == NULL || get(&list) != 0) {
		list = NULL;
	}
	dlclose(h); // drops only the reference taken above
	return list;
}

static bp_ulong bp_wrap_key(void *list, bp_ulong session, bp_ulong mech, bp_ulong wrapping, bp_ulong key,
		unsigned char *out, bp_ulong *outLen) {
	bp_function_list *l = list;
	bp_mechanism m = {mech, NULL, 0};
	return ((bp_wrap_key_fn)l->fn[bp_fn_wrap_key])(session, &m, wrapping, key, out, outLen);
}
*/
import "C"

import (
	"sync"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// wrapKeyMax is the output buffer of a direct C_WrapKey: RFC 5649 of a key
// of up to 48 bytes (8 + 48). K_I needs 24.
const wrapKeyMax = 56

// functionLists caches, per module path, the module's CK_FUNCTION_LIST
// (nil when the module is not loaded in this process).
var functionLists sync.Map // string → unsafe.Pointer

// functionList returns the CK_FUNCTION_LIST of the loaded module at path,
// or nil. miekg/pkcs11 does not expose it; asking the dynamic loader for
// the library it already loaded gives the same list, through public
// interfaces only.
func functionList(path string) unsafe.Pointer {
	if path == "" {
		return nil
	}
	if v, ok := functionLists.Load(path); ok {
		return v.(unsafe.Pointer)
	}
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	l := C.bp_function_list_of(cpath)
	if l != nil {
		functionLists.Store(path, l)
	}
	return l
}

// wrapKeyDirect calls C_WrapKey (a mechanism without parameter) once, with
// an output buffer of wrapKeyMax bytes. miekg/pkcs11's WrapKey asks the
// module for the length first, and NSS softokn 3.87 answers that query
// for CKM_AES_KEY_WRAP_KWP with the key's own length (16), 8 bytes short
// of RFC 5649's output, so its second call fails with
// CKR_BUFFER_TOO_SMALL. ok is false if the function list is unavailable.
func wrapKeyDirect(s Session, mech uint, kek, key pkcs11.ObjectHandle) (wrapped []byte, ok bool, err error) {
	l := functionList(s.module)
	if l == nil {
		return nil, false, nil
	}
	var buf [wrapKeyMax]C.uchar
	n := C.bp_ulong(len(buf))
	rv := C.bp_wrap_key(l, C.bp_ulong(s.H), C.bp_ulong(mech), C.bp_ulong(kek), C.bp_ulong(key), &buf[0], &n)
	if rv != 0 {
		return nil, true, pkcs11.Error(rv)
	}
	if int(n) > len(buf) {
		return nil, true, pkcs11.Error(pkcs11.CKR_GENERAL_ERROR)
	}
	return C.GoBytes(unsafe.Pointer(&buf[0]), C.int(n)), true, nil
}
