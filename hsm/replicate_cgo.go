package hsm

/*
#include <stdlib.h>
#include <string.h>

typedef unsigned long bp_rep_ulong;

// CK_ATTRIBUTE, natural alignment.
typedef struct {
	bp_rep_ulong type;
	void *pValue;
	bp_rep_ulong ulValueLen;
} bp_rep_attribute;

typedef bp_rep_ulong (*bp_rep_get_attribute_value_fn)(bp_rep_ulong, bp_rep_ulong, bp_rep_attribute *, bp_rep_ulong);

// C_GetAttributeValue is entry 24 of CK_FUNCTION_LIST (after the
// two-byte version; wrap_cgo.go's bp_function_list).
typedef struct {
	unsigned char version[2];
	void *fn[61];
} bp_rep_function_list;

enum { bp_rep_fn_get_attribute_value = 24 };

// bp_rep_read_array reads the values of an array attribute (a
// CKA_UNWRAP_TEMPLATE) whose n entries' types and lengths a first call
// gave: inner holds them, each pValue pointing at a buffer of its length.
static bp_rep_ulong bp_rep_read_array(void *list, bp_rep_ulong session, bp_rep_ulong object, bp_rep_ulong type,
		bp_rep_attribute *inner, bp_rep_ulong n) {
	bp_rep_function_list *l = list;
	bp_rep_attribute outer = {type, inner, n * sizeof(bp_rep_attribute)};
	return ((bp_rep_get_attribute_value_fn)l->fn[bp_rep_fn_get_attribute_value])(session, object, &outer, 1);
}
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// readArrayAttribute reads an array attribute of h (CKA_UNWRAP_TEMPLATE,
// CKA_WRAP_TEMPLATE) with its values: type → value bytes. miekg/pkcs11
// v1.1.2 makes the two calls that give the array's entries with their
// types and lengths, not the third that fills their values; that one
// goes through the module's function list (wrap_cgo.go's functionList).
// An attribute the object does not have is (nil, nil).
func readArrayAttribute(s Session, h pkcs11.ObjectHandle, typ uint) (map[uint][]byte, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
	if IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) {
		return nil, nil
	}
	if err != nil {
		return nil, Call("C_GetAttributeValue", nil, err)
	}
	size := int(C.sizeof_bp_rep_attribute)
	raw := a[0].Value
	if len(raw)%size != 0 {
		return nil, errors.New("array attribute of an odd length")
	}
	n := len(raw) / size
	out := map[uint][]byte{}
	if n == 0 {
		return out, nil
	}
	l := functionList(s.module)
	if l == nil {
		return nil, errors.New("the module's function list is not reachable (read an array attribute's values)")
	}
	types := make([]uint, n)
	lens := make([]int, n)
	total := 0
	for i := range n {
		e := raw[i*size : (i+1)*size]
		types[i] = uint(binary.NativeEndian.Uint64(e[0:8]))
		lens[i] = int(binary.NativeEndian.Uint64(e[16:24]))
		if lens[i] < 0 || lens[i] > 1<<16 {
			return nil, errors.New("array attribute entry of an impossible length")
		}
		total += lens[i]
	}
	inner := (*C.bp_rep_attribute)(C.calloc(C.size_t(n), C.size_t(size)))
	buf := C.calloc(C.size_t(total+1), 1)
	if inner == nil || buf == nil {
		C.free(unsafe.Pointer(inner))
		C.free(buf)
		return nil, errors.New("out of C memory")
	}
	defer C.free(unsafe.Pointer(inner))
	defer C.free(buf)
	entries := unsafe.Slice(inner, n)
	off := 0
	for i := range n {
		entries[i]._type = C.bp_rep_ulong(types[i])
		entries[i].pValue = unsafe.Add(buf, off)
		entries[i].ulValueLen = C.bp_rep_ulong(lens[i])
		off += lens[i]
	}
	if rv := C.bp_rep_read_array(l, C.bp_rep_ulong(s.H), C.bp_rep_ulong(h), C.bp_rep_ulong(typ), inner, C.bp_rep_ulong(n)); rv != 0 {
		return nil, Call("C_GetAttributeValue", nil, pkcs11.Error(rv))
	}
	for i := range n {
		out[uint(entries[i]._type)] = C.GoBytes(entries[i].pValue, C.int(entries[i].ulValueLen))
	}
	return out, nil
}
