package pinholder

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
)

// unwrapKWP undoes RFC 5649 (AES key wrap with padding) with decrypt, a
// raw AES block decryption: the host's own AES under a key the attacker
// read, or a C_Decrypt(CKM_AES_ECB) oracle of a KEK whose CKA_DECRYPT the
// attacker switched on. It is the attacker's step from a stored blob to
// K_I. (Only for blobs of two or more semiblocks, as every blob is.)
func unwrapKWP(decrypt func(block []byte) ([]byte, error), c []byte) ([]byte, error) {
	if len(c) < 24 || len(c)%8 != 0 {
		return nil, errors.New("not an RFC 5649 blob")
	}
	n := len(c)/8 - 1
	a := binary.BigEndian.Uint64(c[:8])
	r := make([]byte, n*8)
	copy(r, c[8:])
	in := make([]byte, 16)
	for j := 5; j >= 0; j-- {
		for i := n; i >= 1; i-- {
			binary.BigEndian.PutUint64(in[:8], a^uint64(n*j+i))
			copy(in[8:], r[(i-1)*8:i*8])
			b, err := decrypt(in)
			if err != nil {
				return nil, err
			}
			a = binary.BigEndian.Uint64(b[:8])
			copy(r[(i-1)*8:i*8], b[8:16])
		}
	}
	mli := int(a & 0xFFFFFFFF)
	if a>>32 != 0xA65959A6 || mli > len(r) || mli <= len(r)-8 {
		return nil, errors.New("RFC 5649 integrity check failed")
	}
	return r[:mli], nil
}

// aesDecrypter is the host's AES block decryption under key.
func aesDecrypter(key []byte) (func([]byte) ([]byte, error), error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return func(in []byte) ([]byte, error) {
		out := make([]byte, 16)
		b.Decrypt(out, in)
		return out, nil
	}, nil
}

// cbcPadDecrypt undoes CKM_AES_CBC_PAD with a zero IV, the attacker's own
// wrap of a key they want to read.
func cbcPadDecrypt(key, c []byte) ([]byte, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	if len(c) == 0 || len(c)%16 != 0 {
		return nil, errors.New("not a CBC-PAD ciphertext")
	}
	out := make([]byte, len(c))
	cipher.NewCBCDecrypter(b, make([]byte, 16)).CryptBlocks(out, c)
	p := int(out[len(out)-1])
	if p == 0 || p > 16 {
		return nil, errors.New("bad padding")
	}
	return out[:len(out)-p], nil
}
