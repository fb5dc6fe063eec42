package hsm

/*
#include <stdlib.h>
#include <string.h>

// The PKCS#11 3.0 structures of CKM_SP800_108_COUNTER_KDF (Current
// Mechanisms 3.0 §2.43, SP 800-108 Key Derivation), with the platform's
// natural alignment and CK_ULONG = unsigned long, CK_BBOOL = unsigned
// char, as on every Unix-like system (see derive_cgo.go).
typedef struct {
	unsigned long type;          // CK_PRF_DATA_TYPE
	void *pValue;                // CK_VOID_PTR
	unsigned long ulValueLen;    // CK_ULONG
} bp_prf_data_param;

typedef struct {
	unsigned char bLittleEndian; // CK_BBOOL
	unsigned long ulWidthInBits;
} bp_sp800_108_counter_format;

typedef struct {
	unsigned long dkmLengthMethod; // CK_SP800_108_DKM_LENGTH_METHOD
	unsigned char bLittleEndian;
	unsigned long ulWidthInBits;
} bp_sp800_108_dkm_length_format;

typedef struct {
	unsigned long prfType;               // CK_SP800_108_PRF_TYPE (a CKM_)
	unsigned long ulNumberOfDataParams;
	bp_prf_data_param *pDataParams;
	unsigned long ulAdditionalDerivedKeys;
	void *pAdditionalDerivedKeys;        // CK_DERIVED_KEY_PTR
} bp_sp800_108_kdf_params;

enum {
	BP_SP800_108_ITERATION_VARIABLE = 1, // CK_SP800_108_ITERATION_VARIABLE
	BP_SP800_108_DKM_LENGTH = 3,         // CK_SP800_108_DKM_LENGTH
	BP_SP800_108_BYTE_ARRAY = 4,         // CK_SP800_108_BYTE_ARRAY
	BP_SP800_108_DKM_LENGTH_SUM_OF_KEYS = 1,
};

// Everything pDataParams reaches, in one C allocation: the five data
// parameters, the counter and [L] formats, the 0x00 separator, and the
// label and context bytes after the structure.
typedef struct {
	bp_prf_data_param params[5];
	bp_sp800_108_counter_format counter;
	bp_sp800_108_dkm_length_format dkm;
	unsigned char separator;
} bp_kbkdf_block;

// bp_kbkdf_params fills *out for SP 800-108 counter mode with PRF prf and
// the PRF input
//
//	[i]_2 (32-bit big-endian) ‖ label ‖ 0x00 ‖ context ‖ [L]_2 (32-bit big-endian)
//
// with L the sum of the derived keys' lengths in bits (here: K_I alone).
// It returns the block out points into (free it after the call), or NULL.
static void *bp_kbkdf_params(unsigned long prf, const void *label, size_t labelLen,
		const void *context, size_t contextLen, bp_sp800_108_kdf_params *out) {
	bp_kbkdf_block *b = calloc(1, sizeof(bp_kbkdf_block) + labelLen + contextLen);
	if (b == NULL) {
		return NULL;
	}
	unsigned char *lab = (unsigned char *)(b + 1);
	unsigned char *ctx = lab + labelLen;
	if (labelLen != 0) {
		memcpy(lab, label, labelLen);
	}
	if (contextLen != 0) {
		memcpy(ctx, context, contextLen);
	}
	b->counter.bLittleEndian = 0;
	b->counter.ulWidthInBits = 32;
	b->dkm.dkmLengthMethod = BP_SP800_108_DKM_LENGTH_SUM_OF_KEYS;
	b->dkm.bLittleEndian = 0;
	b->dkm.ulWidthInBits = 32;
	b->separator = 0x00;
	b->params[0].type = BP_SP800_108_ITERATION_VARIABLE;
	b->params[0].pValue = &b->counter;
	b->params[0].ulValueLen = sizeof(b->counter);
	b->params[1].type = BP_SP800_108_BYTE_ARRAY;
	b->params[1].pValue = lab;
	b->params[1].ulValueLen = labelLen;
	b->params[2].type = BP_SP800_108_BYTE_ARRAY;
	b->params[2].pValue = &b->separator;
	b->params[2].ulValueLen = 1;
	b->params[3].type = BP_SP800_108_BYTE_ARRAY;
	b->params[3].pValue = ctx;
	b->params[3].ulValueLen = contextLen;
	b->params[4].type = BP_SP800_108_DKM_LENGTH;
	b->params[4].pValue = &b->dkm;
	b->params[4].ulValueLen = sizeof(b->dkm);
	out->prfType = prf;
	out->ulNumberOfDataParams = 5;
	out->pDataParams = b->params;
	out->ulAdditionalDerivedKeys = 0;
	out->pAdditionalDerivedKeys = NULL;
	return b;
}
*/
import "C"

import (
	"errors"
	"unsafe"
)

// MechSP800108CounterKDF is CKM_SP800_108_COUNTER_KDF (PKCS#11 3.0,
// 0x3AC): NIST SP 800-108 KDF in counter mode, the in-token step of the
// kbkdf profiles. miekg/pkcs11 v1.1.2 predates PKCS#11 3.0 and has no
// constant for it.
const MechSP800108CounterKDF uint = 0x3AC

// kbkdfPRF is the PRF the kbkdf profiles ask the token for
// (CK_SP800_108_KDF_PARAMS.prfType): HMAC-SHA256. docs/DECISIONS.md says
// why not AES-CMAC.
const kbkdfPRF uint = 0x251 // CKM_SHA256_HMAC

// sp800108CounterParams builds the parameter of CKM_SP800_108_COUNTER_KDF,
//
//	CK_SP800_108_KDF_PARAMS { prfType; ulNumberOfDataParams = 5; pDataParams;
//	                          ulAdditionalDerivedKeys = 0; pAdditionalDerivedKeys = NULL }
//
// with the data parameters, in order,
//
//	CK_SP800_108_ITERATION_VARIABLE  CK_SP800_108_COUNTER_FORMAT { big-endian, 32 bits }
//	CK_SP800_108_BYTE_ARRAY          label
//	CK_SP800_108_BYTE_ARRAY          0x00
//	CK_SP800_108_BYTE_ARRAY          context
//	CK_SP800_108_DKM_LENGTH          CK_SP800_108_DKM_LENGTH_FORMAT { SUM_OF_KEYS, big-endian, 32 bits }
//
// which miekg/pkcs11 v1.1.2 cannot marshal. It returns the structure's
// bytes, to be passed as Mechanism.Parameter (miekg/pkcs11 copies them
// into C memory for the call), and the C memory the structure points
// into, which the caller frees after the call.
func sp800108CounterParams(prf uint, label, context []byte) ([]byte, *cMem, error) {
	var out C.bp_sp800_108_kdf_params
	var lp, cp unsafe.Pointer
	if len(label) > 0 {
		lp = unsafe.Pointer(&label[0])
	}
	if len(context) > 0 {
		cp = unsafe.Pointer(&context[0])
	}
	// The C function copies label and context before it returns and
	// keeps no Go pointer.
	p := C.bp_kbkdf_params(C.ulong(prf), lp, C.size_t(len(label)), cp, C.size_t(len(context)), &out)
	if p == nil {
		return nil, nil, errors.New("out of C memory")
	}
	mem := &cMem{p: p, n: int(C.sizeof_bp_kbkdf_block) + len(label) + len(context)}
	// out holds C pointers only: copying its bytes breaks no cgo rule.
	return C.GoBytes(unsafe.Pointer(&out), C.int(C.sizeof_bp_sp800_108_kdf_params)), mem, nil
}
