package protocol

import (
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
)

// Vector is one test vector of testdata/vectors.json. Every implementation
// of either side must reproduce it: a card fed CardRand as its random
// source must answer C and then MAC; a token chain given C must derive a
// K_I under which MAC verifies. testdata/README.md says how they were made.
type Vector struct {
	Name    string `json:"name"`
	Profile string `json:"profile"`
	// IssuerKeyFile is the TEST issuer private key (PKCS#8 PEM), relative
	// to testdata/. It exists only so token chains can be checked.
	IssuerKeyFile string `json:"issuer_key_file"`
	IssuerSPKI    Hex    `json:"issuer_spki"`
	Fingerprint   Hex    `json:"issuer_fingerprint"`
	// CardRand is every byte the card draws from its RNG, in order.
	CardRand Hex `json:"card_rand"`
	Secret   Hex `json:"secret"`  // S
	Binding  Hex `json:"binding"` // B
	// AESKDFInput is SHA-256(B)[0:16], for the aes KDF only.
	AESKDFInput Hex `json:"aes_kdf_input,omitempty"`
	// KBKDFInput is the kbkdf KDF's PRF input u32be(1) ‖ KBKDFLabel ‖
	// 0x00 ‖ B ‖ u32be(128), for the kbkdf KDF only.
	KBKDFInput Hex `json:"kbkdf_input,omitempty"`
	C          Hex `json:"c"`
	KI         Hex `json:"k_i"`
	CardID     Hex `json:"card_id"`
	Challenge  Hex `json:"challenge"`
	MAC        Hex `json:"mac"`
}

// ReadVectors loads a vectors file.
func ReadVectors(path string) ([]Vector, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var v []Vector
	if err := json.Unmarshal(b, &v); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return v, nil
}

// Hex is a byte string that encodes as lower-case hex in JSON.
type Hex []byte

func (h Hex) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

func (h *Hex) UnmarshalText(b []byte) error {
	v, err := hex.DecodeString(string(b))
	if err != nil {
		return err
	}
	*h = v
	return nil
}

func (h Hex) String() string { return hex.EncodeToString(h) }
