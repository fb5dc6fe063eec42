package protocol

import (
	"crypto/aes"
	"crypto/ecdh"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/big"
)

// Sizes fixed by the protocol.
const (
	KeySize       = 16 // K_I is an AES-128 key
	OAEPSecretLen = 32 // S for rsa-oaep: 32 random bytes
	ECPointLen    = 65 // c for ecdh-p256: uncompressed point 04 ‖ X ‖ Y
)

// Encapsulate is the card's step 2–3 of the paper: draw the secret, encrypt
// it to the issuer. It returns S (the input of the KDF) and c. All
// randomness is read from rand, in the order docs/PROTOCOL.md gives, so
// that test vectors can fix it.
func Encapsulate(p Profile, k *IssuerKey, rand io.Reader) (s, c []byte, err error) {
	if err := k.Fits(p); err != nil {
		return nil, nil, err
	}
	switch p.Transport {
	case RSARaw:
		r, err := drawRSARaw(k.RSA, rand)
		if err != nil {
			return nil, nil, err
		}
		s = r.FillBytes(make([]byte, k.RSA.Size()))
		c, err := EncryptSecret(p, k, s, rand)
		return s, c, err
	case RSAOAEP:
		s = make([]byte, OAEPSecretLen)
		if _, err := io.ReadFull(rand, s); err != nil {
			return nil, nil, fmt.Errorf("draw r: %w", err)
		}
		c, err := EncryptSecret(p, k, s, rand)
		return s, c, err
	case ECDHP256:
		eph, err := drawP256(rand)
		if err != nil {
			return nil, nil, err
		}
		z, err := eph.ECDH(k.EC)
		if err != nil {
			return nil, nil, fmt.Errorf("ECDH: %w", err)
		}
		return z, eph.PublicKey().Bytes(), nil
	}
	return nil, nil, fmt.Errorf("profile %s: unknown transport", p.Name)
}

// ErrNoEncryption: the profile's transport does not encrypt S (ECDH: S is
// the shared secret Z, which only the ephemeral key and the issuer's key
// can make), so there is no c to compute from a given S.
var ErrNoEncryption = errors.New("the transport does not encrypt S: c cannot be made from S")

// EncryptSecret is the card's step 3 for a given S: c, the encryption of S
// to the issuer key k under profile p (docs/PROTOCOL.md §3.2). Encapsulate
// is "draw S, then EncryptSecret"; this half alone serves whoever must
// carry a known S to an issuer — the tests' and the demo's active insider
// (paper Fig. 2) re-encrypting the S it opened under its own key.
//
//   - rsa-raw: S is I2OSP(r, k) with k the modulus length; r must be below
//     n. c = I2OSP(r^e mod n, k). Deterministic; rand is not read.
//   - rsa-oaep: S is 32 bytes; c = RSAES-OAEP(SHA-1, MGF1-SHA-1, empty
//     label), whose 20-byte seed is read from rand.
//   - ecdh-p256: ErrNoEncryption.
func EncryptSecret(p Profile, k *IssuerKey, s []byte, rand io.Reader) ([]byte, error) {
	if err := k.Fits(p); err != nil {
		return nil, err
	}
	switch p.Transport {
	case RSARaw:
		if len(s) != k.RSA.Size() {
			return nil, fmt.Errorf("rsa-raw: S is %d bytes, want %d (the modulus length)", len(s), k.RSA.Size())
		}
		r := new(big.Int).SetBytes(s)
		if r.Cmp(k.RSA.N) >= 0 {
			return nil, errors.New("rsa-raw: S is not below the RSA modulus")
		}
		return rsaRaw(k.RSA, r), nil
	case RSAOAEP:
		if len(s) != OAEPSecretLen {
			return nil, fmt.Errorf("rsa-oaep: S is %d bytes, want %d", len(s), OAEPSecretLen)
		}
		// EncryptOAEP reads exactly the 20-byte seed from rand.
		c, err := rsa.EncryptOAEP(sha1.New(), rand, k.RSA, s, nil)
		if err != nil {
			return nil, fmt.Errorf("RSA-OAEP encrypt: %w", err)
		}
		return c, nil
	case ECDHP256:
		return nil, fmt.Errorf("profile %s: %w", p.Name, ErrNoEncryption)
	}
	return nil, fmt.Errorf("profile %s: unknown transport", p.Name)
}

// drawRSARaw draws r uniformly from [2, n-1) by rejection: k bytes at a
// time, the top byte masked to the bit length of n.
func drawRSARaw(pub *rsa.PublicKey, rand io.Reader) (*big.Int, error) {
	k := pub.Size()
	buf := make([]byte, k)
	mask := byte(0xFF >> (8*k - pub.N.BitLen()))
	limit := new(big.Int).Sub(pub.N, big.NewInt(1))
	two := big.NewInt(2)
	r := new(big.Int)
	for range 1000 {
		if _, err := io.ReadFull(rand, buf); err != nil {
			return nil, fmt.Errorf("draw r: %w", err)
		}
		buf[0] &= mask
		r.SetBytes(buf)
		if r.Cmp(two) >= 0 && r.Cmp(limit) < 0 {
			return r, nil
		}
	}
	return nil, errors.New("draw r: random source is not random")
}

func rsaRaw(pub *rsa.PublicKey, r *big.Int) []byte {
	c := new(big.Int).Exp(r, big.NewInt(int64(pub.E)), pub.N)
	return c.FillBytes(make([]byte, pub.Size()))
}

// drawP256 draws the ephemeral scalar: 32 bytes at a time until they form
// a valid private key (non-zero, below the group order).
func drawP256(rand io.Reader) (*ecdh.PrivateKey, error) {
	buf := make([]byte, 32)
	for range 1000 {
		if _, err := io.ReadFull(rand, buf); err != nil {
			return nil, fmt.Errorf("draw ephemeral key: %w", err)
		}
		if k, err := ecdh.P256().NewPrivateKey(buf); err == nil {
			return k, nil
		}
	}
	return nil, errors.New("draw ephemeral key: random source is not random")
}

// DeriveKey is the KDF of profile p: K_I from S and B. This is what the
// card computes and what the issuer's token must reproduce in-token.
func DeriveKey(p Profile, s, b []byte) ([]byte, error) {
	switch p.KDF {
	case SHA1:
		h := sha1.New()
		h.Write(s)
		h.Write(b)
		return h.Sum(nil)[:KeySize], nil
	case X963:
		h := sha1.New()
		h.Write(s)
		h.Write([]byte{0, 0, 0, 1})
		h.Write(b)
		return h.Sum(nil)[:KeySize], nil
	case AES:
		if len(s) != 32 {
			return nil, fmt.Errorf("kdf aes: S is %d bytes, want 32 (an AES-256 key)", len(s))
		}
		blk, err := aes.NewCipher(s)
		if err != nil {
			return nil, err
		}
		m := AESKDFInput(b)
		ki := make([]byte, KeySize)
		blk.Encrypt(ki, m)
		return ki, nil
	case KBKDF:
		// S is 32 bytes for both transports it is paired with (r, Z).
		if len(s) != 32 {
			return nil, fmt.Errorf("kdf kbkdf: S is %d bytes, want 32", len(s))
		}
		return CounterKDFHMACSHA256(s, []byte(KBKDFLabel), b, 8*KeySize)
	}
	return nil, fmt.Errorf("profile %s: unknown KDF", p.Name)
}

// AESKDFInput is the block the aes KDF encrypts under S: the first 16 bytes
// of SHA-256(B). It is public; the token is given it as derivation data.
func AESKDFInput(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:aes.BlockSize]
}

// ValidCiphertext checks the shape of c for profile p under issuer key k:
// its exact length, and for RSA that it is below n, for ECDH that it is a
// point on P-256. It does not (cannot) check that c decrypts.
func ValidCiphertext(p Profile, k *IssuerKey, c []byte) error {
	if err := k.Fits(p); err != nil {
		return err
	}
	if want := k.CiphertextLen(p.Transport); len(c) != want {
		return fmt.Errorf("c is %d bytes, want %d for %s", len(c), want, p.Name)
	}
	switch p.Transport {
	case RSARaw, RSAOAEP:
		if new(big.Int).SetBytes(c).Cmp(k.RSA.N) >= 0 {
			return errors.New("c is not below the RSA modulus")
		}
	case ECDHP256:
		if _, err := ecdh.P256().NewPublicKey(c); err != nil {
			return fmt.Errorf("c is not a P-256 point: %w", err)
		}
	}
	return nil
}
