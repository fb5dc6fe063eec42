package hsm

/*
#include <stdlib.h>
#include <string.h>

// CK_KEY_DERIVATION_STRING_DATA as PKCS#11 v2.40 §2.42 defines it. On
// Unix-like systems PKCS#11 structures use the platform's natural
// alignment (only Windows packs them to 1 byte), and CK_ULONG is
// unsigned long, so this layout is the module's.
typedef struct {
	unsigned char *pData;
	unsigned long ulLen;
} bp_key_derivation_string_data;

static void *bp_copy(const void *src, size_t n) {
	void *p = malloc(n ? n : 1);
	if (p != NULL && n != 0) {
		memcpy(p, src, n);
	}
	return p;
}
*/
import "C"

import (
	"errors"
	"unsafe"
)

// cMem is memory in the C heap that must outlive one PKCS#11 call. Go
// memory cannot be used: a mechanism parameter that holds a pointer is
// copied into C memory by miekg/pkcs11 (Mechanism.Parameter bytes are
// calloc'ed and memmoved for the call), but only the outer structure is
// copied — what its pointer points to must already be C memory, or the
// cgo pointer rules are broken and the garbage collector may move or free
// it while the module reads it.
type cMem struct {
	p unsafe.Pointer
	n int
}

// newCMem copies b into the C heap. free must be called once the PKCS#11
// call that uses it has returned.
func newCMem(b []byte) (*cMem, error) {
	var src unsafe.Pointer
	if len(b) > 0 {
		src = unsafe.Pointer(&b[0])
	}
	p := C.bp_copy(src, C.size_t(len(b)))
	if p == nil {
		return nil, errors.New("out of C memory")
	}
	return &cMem{p: p, n: len(b)}, nil
}

// free releases the C copy. It is safe to call more than once.
func (m *cMem) free() {
	if m != nil && m.p != nil {
		C.free(m.p)
		m.p = nil
	}
}

// derivationStringData builds the parameter of CKM_CONCATENATE_BASE_AND_DATA
// and of the CKM_*_ENCRYPT_DATA derivations,
//
//	CK_KEY_DERIVATION_STRING_DATA { CK_BYTE_PTR pData; CK_ULONG ulLen; }
//
// which miekg/pkcs11 v1.1.2 has no marshaller for. It returns the
// structure's bytes, to be passed as Mechanism.Parameter (miekg/pkcs11
// copies them into C memory for the call), and the C copy of data that
// pData points to, which the caller frees after the call.
func derivationStringData(data []byte) ([]byte, *cMem, error) {
	m, err := newCMem(data)
	if err != nil {
		return nil, nil, err
	}
	var s C.bp_key_derivation_string_data
	s.pData = (*C.uchar)(m.p)
	s.ulLen = C.ulong(len(data))
	// The structure holds a C pointer, not a Go one: copying its bytes
	// into a Go slice breaks no cgo rule.
	return C.GoBytes(unsafe.Pointer(&s), C.int(C.sizeof_bp_key_derivation_string_data)), m, nil
}
