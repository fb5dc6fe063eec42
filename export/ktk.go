package export

import (
	"bytes"
	"encoding/pem"
	"errors"
	"fmt"
)

// KTKPEMType is the PEM type of a KTK wrapped to the issuer's key-import
// key (RSA-OAEP, docs/EXPORT.md): the file the receiver sends.
const KTKPEMType = "BLINDPERSO KTK"

// MarshalWrappedKTK is the file the receiver sends: the wrapped KTK as
// PEM.
func MarshalWrappedKTK(wrapped []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: KTKPEMType, Bytes: wrapped})
}

// ParseWrappedKTK reads that file: one PEM block of type KTKPEMType
// (white space around it allowed, no headers, nothing else), or the raw
// ciphertext as a partner's HSM may write it. format is "pem" or "raw".
func ParseWrappedKTK(b []byte) (ciphertext []byte, format string, err error) {
	ciphertext, format = b, "raw"
	if t := bytes.TrimLeft(b, " \t\r\n"); bytes.HasPrefix(t, []byte("-----BEGIN ")) {
		blk, rest := pem.Decode(t)
		switch {
		case blk == nil:
			return nil, "", errors.New("starts like PEM but holds no PEM block")
		case blk.Type != KTKPEMType:
			return nil, "", fmt.Errorf("PEM block %q, want %q", blk.Type, KTKPEMType)
		case len(blk.Headers) > 0:
			return nil, "", fmt.Errorf("PEM headers are not part of the %q format", KTKPEMType)
		case len(bytes.TrimSpace(rest)) > 0:
			return nil, "", fmt.Errorf("data after the %q block (one block per file)", KTKPEMType)
		}
		ciphertext, format = blk.Bytes, "pem"
	}
	if len(ciphertext) == 0 {
		return nil, "", errors.New("empty")
	}
	return ciphertext, format, nil
}
