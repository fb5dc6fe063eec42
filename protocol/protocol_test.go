package protocol

import (
	"bytes"
	"crypto/aes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"math/big"
	"strings"
	"testing"

	"github.com/aead/cmac"
)

func aesEncryptBlock(t *testing.T, key, in []byte) []byte {
	t.Helper()
	blk, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 16)
	blk.Encrypt(out, in)
	return out
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		panic(err)
	}
	return b
}

// The MAC primitive must be AES-CMAC exactly as in RFC 4493 §4.
func TestCMACIsRFC4493(t *testing.T) {
	key := unhex("2b7e1516 28aed2a6 abf71588 09cf4f3c")
	msg := unhex("6bc1bee2 2e409f96 e93d7e11 7393172a ae2d8a57 1e03ac9c 9eb76fac 45af8e51 30c81c46 a35ce411")
	blk, _ := aes.NewCipher(key)
	for _, tc := range []struct {
		n    int
		want string
	}{
		{0, "bb1d6929 e9593728 7fa37d12 9b756746"},
		{16, "070a16b4 6b4d4144 f79bdd9d d04a287c"},
		{40, "dfa66747 de9ae630 30ca3261 1497c827"},
	} {
		got, err := cmac.Sum(msg[:tc.n], blk, 16)
		if err != nil || !bytes.Equal(got, unhex(tc.want)) {
			t.Errorf("CMAC of %d bytes = %x, %v; want %s", tc.n, got, err, tc.want)
		}
	}
}

func TestProfiles(t *testing.T) {
	if len(Profiles()) != 7 {
		t.Fatalf("%d profiles, want 7 (the brief's 5 and the two kbkdf ones)", len(Profiles()))
	}
	for _, p := range Profiles() {
		byName, err := ProfileByName(p.Name)
		if err != nil || byName != p {
			t.Errorf("ProfileByName(%q) = %v, %v", p.Name, byName, err)
		}
		byID, err := ProfileByID(p.ID)
		if err != nil || byID != p {
			t.Errorf("ProfileByID(%#x) = %v, %v", p.ID, byID, err)
		}
		if want := p.Transport.String() + "-" + p.KDF.String(); p.Name != want {
			t.Errorf("profile %s is named against its parts (%s)", p.Name, want)
		}
	}
	if _, err := ProfileByName("rsa-raw-md5"); err == nil || !strings.Contains(err.Error(), "rsa-oaep-aes") {
		t.Errorf("unknown profile error should list the valid ones: %v", err)
	}
	if _, err := ProfileByID(0); err == nil {
		t.Error("profile id 0 accepted")
	}
}

// Changing the profile or one bit of the key changes B, and so K_I.
func TestBindingSeparates(t *testing.T) {
	spki := unhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004")
	b1 := Binding(ECDHP256X963, spki)
	b2 := Binding(ECDHP256AES, spki)
	spki2 := bytes.Clone(spki)
	spki2[len(spki2)-1] ^= 1
	b3 := Binding(ECDHP256X963, spki2)
	if bytes.Equal(b1, b2) || bytes.Equal(b1, b3) {
		t.Fatal("binding does not separate profile and key")
	}
	if !bytes.HasPrefix(b1, []byte(BindingLabel)) {
		t.Fatal("binding does not start with its label")
	}
}

func TestParseIssuerKey(t *testing.T) {
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der := func(k any) []byte {
		b, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	good := der(&p256.PublicKey)
	rsa2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	even := rsa2048.PublicKey
	even.N = new(big.Int).Add(even.N, big.NewInt(1))
	padded := append(bytes.Clone(good), 0)
	for _, tc := range []struct {
		name string
		in   []byte
		want string
	}{
		{"garbage", []byte("hello"), "not a DER"},
		{"trailing byte", padded, "not a DER"},
		{"rsa-1024", der(&rsa1024.PublicKey), "RSA modulus of 1024 bits"},
		{"even modulus", der(&even), "RSA modulus is even"},
		{"p-384", der(&p384.PublicKey), "want P-256"},
		{"p-256", good, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := ParseIssuerKey(tc.in)
			if tc.want == "" {
				if err != nil || k.EC == nil {
					t.Fatalf("ParseIssuerKey: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	if _, err := ParseIssuerKeyPEM([]byte("-----BEGIN RSA PRIVATE KEY-----\nAA==\n-----END RSA PRIVATE KEY-----\n")); err == nil || !strings.Contains(err.Error(), "PUBLIC KEY") {
		t.Fatalf("a private key PEM block should be named in the error: %v", err)
	}
}

func TestValidCiphertext(t *testing.T) {
	vs, err := ReadVectors(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		p, _ := ProfileByName(v.Profile)
		k, err := ParseIssuerKey(v.IssuerSPKI)
		if err != nil {
			t.Fatal(err)
		}
		if err := ValidCiphertext(p, k, v.C); err != nil {
			t.Errorf("%s: valid c refused: %v", v.Name, err)
		}
		if err := ValidCiphertext(p, k, v.C[1:]); err == nil {
			t.Errorf("%s: short c accepted", v.Name)
		}
		bad := bytes.Clone(v.C)
		if p.Transport == ECDHP256 {
			bad[64] ^= 1 // off the curve
		} else {
			for i := range bad {
				bad[i] = 0xFF // above n
			}
		}
		if err := ValidCiphertext(p, k, bad); err == nil {
			t.Errorf("%s: malformed c accepted", v.Name)
		}
	}
}

func TestAuthMessage(t *testing.T) {
	ch := make([]byte, ChallengeLen)
	m, err := AuthMessage([]byte{1, 2}, ch)
	if err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte(AuthLabel), 2, 1, 2), ch...)
	if !bytes.Equal(m, want) {
		t.Fatalf("AuthMessage = %x, want %x", m, want)
	}
	for _, tc := range []struct{ id, ch []byte }{
		{nil, ch}, {make([]byte, 17), ch}, {[]byte{1}, ch[:15]},
	} {
		if _, err := AuthMessage(tc.id, tc.ch); err == nil {
			t.Errorf("AuthMessage(%x, %x) accepted", tc.id, tc.ch)
		}
	}
}
