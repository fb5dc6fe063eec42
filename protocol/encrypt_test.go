package protocol

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509"
	"errors"
	"math/big"
	"testing"
)

func testIssuerKey(t *testing.T, file string) (any, *IssuerKey) {
	t.Helper()
	priv := loadTestKey(t, file)
	spki, err := x509.MarshalPKIXPublicKey(publicOf(priv))
	if err != nil {
		t.Fatal(err)
	}
	k, err := ParseIssuerKey(spki)
	if err != nil {
		t.Fatal(err)
	}
	return priv, k
}

// EncryptSecret is the second half of Encapsulate: for a given S it makes
// the c that the card would send, and that c opens to S under the
// issuer's private key.
func TestEncryptSecret(t *testing.T) {
	priv, k := testIssuerKey(t, "keys/rsa2048.pem")
	sk := priv.(*rsa.PrivateKey)
	for _, p := range []Profile{RSARawSHA1, RSAOAEPSHA1, RSAOAEPAES} {
		t.Run(p.Name, func(t *testing.T) {
			s, c, err := Encapsulate(p, k, &testStream{seed: []byte("encrypt secret " + p.Name)})
			if err != nil {
				t.Fatal(err)
			}
			c2, err := EncryptSecret(p, k, s, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			if err := ValidCiphertext(p, k, c2); err != nil {
				t.Fatal(err)
			}
			var got []byte
			switch p.Transport {
			case RSARaw:
				if !bytes.Equal(c2, c) {
					t.Error("rsa-raw: EncryptSecret(S) differs from the card's c (it is deterministic)")
				}
				got = new(big.Int).Exp(new(big.Int).SetBytes(c2), sk.D, sk.N).FillBytes(make([]byte, k.RSA.Size()))
			case RSAOAEP:
				if got, err = rsa.DecryptOAEP(sha1.New(), nil, sk, c2, nil); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(got, s) {
				t.Error("c does not open to S under the issuer's private key")
			}
		})
	}

	// The OAEP seed comes from rand: the same rand, the same c.
	s := bytes.Repeat([]byte{7}, OAEPSecretLen)
	c1, _ := EncryptSecret(RSAOAEPAES, k, s, &testStream{seed: []byte("seed")})
	c2, _ := EncryptSecret(RSAOAEPAES, k, s, &testStream{seed: []byte("seed")})
	c3, _ := EncryptSecret(RSAOAEPAES, k, s, &testStream{seed: []byte("other seed")})
	if !bytes.Equal(c1, c2) || bytes.Equal(c1, c3) {
		t.Error("rsa-oaep: c is not a function of S and the bytes read from rand")
	}

	// What cannot be encrypted is refused, naming why.
	if _, err := EncryptSecret(RSARawSHA1, k, k.RSA.N.Bytes(), rand.Reader); err == nil {
		t.Error("rsa-raw: S = n accepted")
	}
	if _, err := EncryptSecret(RSARawSHA1, k, make([]byte, 32), rand.Reader); err == nil {
		t.Error("rsa-raw: S of 32 bytes accepted")
	}
	if _, err := EncryptSecret(RSAOAEPAES, k, make([]byte, 31), rand.Reader); err == nil {
		t.Error("rsa-oaep: S of 31 bytes accepted")
	}
	if _, err := EncryptSecret(ECDHP256AES, k, make([]byte, 32), rand.Reader); err == nil {
		t.Error("an ECDH profile with an RSA key accepted")
	}
	_, ek := testIssuerKey(t, "keys/p256.pem")
	if _, err := EncryptSecret(ECDHP256X963, ek, make([]byte, 32), rand.Reader); !errors.Is(err, ErrNoEncryption) {
		t.Errorf("ecdh: err = %v, want ErrNoEncryption", err)
	}
}
