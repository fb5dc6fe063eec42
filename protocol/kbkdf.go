package protocol

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
)

// The kbkdf KDF (docs/PROTOCOL.md §3.3): NIST SP 800-108r1 §4.1, the KDF
// in counter mode, with
//
//	PRF      HMAC-SHA256 (h = 256), keyed by S (rsa-oaep: r; ecdh-p256: Z)
//	r        32: the counter [i]_2 is u32be(i), before the fixed data
//	Label    KBKDFLabel, 19 ASCII bytes
//	Context  B (§3.1)
//	L        128, encoded [L]_2 = u32be(128) after the Context
//
// so that n = ⌈L/h⌉ = 1 and
//
//	K_I = HMAC-SHA256(S, u32be(1) ‖ Label ‖ 0x00 ‖ B ‖ u32be(128))[0:16]
//
// This is OpenSSL's KBKDF (EVP_KDF-KB, mode counter, mac HMAC, digest
// SHA256, key S, salt Label, info B) byte for byte, and what PKCS#11 3.0's
// CKM_SP800_108_COUNTER_KDF computes with the data parameters the issuer's
// token is given (package hsm).

// KBKDFLabel is the SP 800-108 Label of the kbkdf KDF: 19 ASCII bytes, no
// terminator. Like B's label it ends in the protocol version.
const KBKDFLabel = "blindperso kbkdf v1"

// kbkdfCounterBytes is r/8: the counter is a 32-bit big-endian integer,
// and so is [L]_2.
const kbkdfCounterBytes = 4

// KBKDFInput is the PRF input of the kbkdf KDF's single iteration (i = 1):
// u32be(1) ‖ KBKDFLabel ‖ 0x00 ‖ B ‖ u32be(128). It is public.
func KBKDFInput(b []byte) []byte {
	return kbkdfBlockInput(1, []byte(KBKDFLabel), b, 8*KeySize)
}

// kbkdfBlockInput is SP 800-108r1 §4.1 step 4's PRF input for iteration i:
// [i]_2 ‖ Label ‖ 0x00 ‖ Context ‖ [L]_2, with 32-bit big-endian [i]_2 and
// [L]_2.
func kbkdfBlockInput(i uint32, label, context []byte, bits uint32) []byte {
	m := make([]byte, 0, 2*kbkdfCounterBytes+len(label)+1+len(context))
	m = binary.BigEndian.AppendUint32(m, i)
	m = append(m, label...)
	m = append(m, 0x00)
	m = append(m, context...)
	return binary.BigEndian.AppendUint32(m, bits)
}

// CounterKDFHMACSHA256 is the SP 800-108r1 §4.1 KDF in counter mode with
// PRF HMAC-SHA256, a 32-bit counter and a 32-bit [L]_2, written from the
// publication's definition:
//
//	n := ⌈L/h⌉ (h = 256); n ≤ 2^32 − 1
//	K(i) := PRF(K_IN, [i]_2 ‖ Label ‖ 0x00 ‖ Context ‖ [L]_2), i = 1 … n
//	K_OUT := the leftmost L bits of K(1) ‖ … ‖ K(n)
//
// bits is L; it must be a positive multiple of 8 (the protocol uses 128).
func CounterKDFHMACSHA256(key, label, context []byte, bits int) ([]byte, error) {
	const h = 8 * sha256.Size
	if bits <= 0 || bits%8 != 0 || uint64(bits) > 0xFFFFFFFF {
		return nil, fmt.Errorf("kbkdf: L = %d bits: want a positive multiple of 8 below 2^32", bits)
	}
	if len(key) == 0 {
		return nil, errors.New("kbkdf: empty key")
	}
	n := (bits + h - 1) / h // ≤ 2^32/256: the counter cannot overflow
	out := make([]byte, 0, n*sha256.Size)
	mac := hmac.New(sha256.New, key)
	for i := 1; i <= n; i++ {
		mac.Reset()
		mac.Write(kbkdfBlockInput(uint32(i), label, context, uint32(bits)))
		out = mac.Sum(out)
	}
	return out[:bits/8], nil
}
