package protocol

import (
	"bytes"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"flag"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/vectors.json from the fixed inputs")

const (
	testdataDir = "../testdata"
	vectorsFile = "../testdata/vectors.json"
)

// vectorInputs are the fixed inputs of every vector: a name (which seeds
// the card's RNG), a profile and a test issuer key.
var vectorInputs = []struct{ name, profile, keyFile string }{
	{"rsa-raw-sha1/rsa2048-e3", "rsa-raw-sha1", "keys/rsa2048-e3.pem"},
	{"rsa-raw-sha1/rsa2048", "rsa-raw-sha1", "keys/rsa2048.pem"},
	{"rsa-raw-sha1/rsa3072", "rsa-raw-sha1", "keys/rsa3072.pem"},
	{"rsa-oaep-sha1/rsa2048", "rsa-oaep-sha1", "keys/rsa2048.pem"},
	{"rsa-oaep-sha1/rsa3072", "rsa-oaep-sha1", "keys/rsa3072.pem"},
	{"rsa-oaep-aes/rsa2048-e3", "rsa-oaep-aes", "keys/rsa2048-e3.pem"},
	{"rsa-oaep-aes/rsa2048", "rsa-oaep-aes", "keys/rsa2048.pem"},
	{"rsa-oaep-aes/rsa3072", "rsa-oaep-aes", "keys/rsa3072.pem"},
	{"ecdh-p256-x963/p256", "ecdh-p256-x963", "keys/p256.pem"},
	{"ecdh-p256-aes/p256", "ecdh-p256-aes", "keys/p256.pem"},
	{"rsa-oaep-kbkdf/rsa2048-e3", "rsa-oaep-kbkdf", "keys/rsa2048-e3.pem"},
	{"rsa-oaep-kbkdf/rsa2048", "rsa-oaep-kbkdf", "keys/rsa2048.pem"},
	{"rsa-oaep-kbkdf/rsa3072", "rsa-oaep-kbkdf", "keys/rsa3072.pem"},
	{"ecdh-p256-kbkdf/p256", "ecdh-p256-kbkdf", "keys/p256.pem"},
}

// testStream is the card RNG of the vectors: SHA-256(seed ‖ u32be(i)) for
// i = 0, 1, 2, … concatenated.
type testStream struct {
	seed []byte
	i    uint32
	buf  []byte
}

func (s *testStream) Read(p []byte) (int, error) {
	for n := 0; n < len(p); {
		if len(s.buf) == 0 {
			h := sha256.Sum256(binary.BigEndian.AppendUint32(bytes.Clone(s.seed), s.i))
			s.i++
			s.buf = h[:]
		}
		c := copy(p[n:], s.buf)
		s.buf = s.buf[c:]
		n += c
	}
	return len(p), nil
}

func loadTestKey(t *testing.T, file string) any {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testdataDir, file))
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", file)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return k
}

func publicOf(priv any) any {
	switch k := priv.(type) {
	case *rsa.PrivateKey:
		return &k.PublicKey
	case *ecdsa.PrivateKey:
		return &k.PublicKey
	}
	return nil
}

func makeVector(t *testing.T, name, profile, keyFile string) Vector {
	t.Helper()
	p, err := ProfileByName(profile)
	if err != nil {
		t.Fatal(err)
	}
	spki, err := x509.MarshalPKIXPublicKey(publicOf(loadTestKey(t, keyFile)))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ParseIssuerKey(spki)
	if err != nil {
		t.Fatal(err)
	}
	var drawn bytes.Buffer
	rng := io.TeeReader(&testStream{seed: []byte("blindperso test vector " + name)}, &drawn)
	s, c, err := Encapsulate(p, key, rng)
	if err != nil {
		t.Fatal(err)
	}
	b := Binding(p, spki)
	ki, err := DeriveKey(p, s, b)
	if err != nil {
		t.Fatal(err)
	}
	idh := sha256.Sum256([]byte("card id " + name))
	chh := sha256.Sum256([]byte("challenge " + name))
	id, challenge := idh[:8], chh[:ChallengeLen]
	mac, err := AuthMAC(ki, id, challenge)
	if err != nil {
		t.Fatal(err)
	}
	fp := key.Fingerprint()
	v := Vector{
		Name: name, Profile: profile, IssuerKeyFile: keyFile,
		IssuerSPKI: spki, Fingerprint: fp[:], CardRand: drawn.Bytes(),
		Secret: s, Binding: b, C: c, KI: ki,
		CardID: id, Challenge: challenge, MAC: mac,
	}
	switch p.KDF {
	case AES:
		v.AESKDFInput = AESKDFInput(b)
	case KBKDF:
		v.KBKDFInput = KBKDFInput(b)
	}
	return v
}

// TestVectors regenerates every vector from its fixed inputs and compares
// it with the file; with -update it rewrites the file instead.
func TestVectors(t *testing.T) {
	var got []Vector
	for _, in := range vectorInputs {
		got = append(got, makeVector(t, in.name, in.profile, in.keyFile))
	}
	enc, err := json.MarshalIndent(got, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	enc = append(enc, '\n')
	if *update {
		if err := os.WriteFile(vectorsFile, enc, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(enc, want) {
		t.Fatalf("%s differs from what the fixed inputs give; run go test ./protocol -run TestVectors -update if the change is intended", vectorsFile)
	}
	seen := map[string]bool{}
	for _, v := range got {
		seen[v.Profile] = true
	}
	for _, p := range Profiles() {
		if !seen[p.Name] {
			t.Errorf("no vector for profile %s", p.Name)
		}
	}
}

// TestVectorsIndependently checks each vector in the file with the issuer's
// private key and from first principles, without Encapsulate or
// DeriveKey: the decryption of c is S, and K_I and the MAC follow from S
// and B as docs/PROTOCOL.md says.
func TestVectorsIndependently(t *testing.T) {
	vs, err := ReadVectors(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		t.Run(v.Name, func(t *testing.T) {
			p, err := ProfileByName(v.Profile)
			if err != nil {
				t.Fatal(err)
			}
			priv := loadTestKey(t, v.IssuerKeyFile)
			if spki, _ := x509.MarshalPKIXPublicKey(publicOf(priv)); !bytes.Equal(spki, v.IssuerSPKI) {
				t.Fatal("issuer_spki is not the key file's public key")
			}
			if fp := sha256.Sum256(v.IssuerSPKI); !bytes.Equal(fp[:], v.Fingerprint) {
				t.Fatal("issuer_fingerprint is not SHA-256 of the SPKI")
			}
			var s []byte
			switch p.Transport {
			case RSARaw:
				k := priv.(*rsa.PrivateKey)
				r := new(big.Int).Exp(new(big.Int).SetBytes(v.C), k.D, k.N)
				s = r.FillBytes(make([]byte, k.Size()))
			case RSAOAEP:
				s, err = rsa.DecryptOAEP(sha1.New(), nil, priv.(*rsa.PrivateKey), v.C, nil)
				if err != nil {
					t.Fatal(err)
				}
			case ECDHP256:
				k, err := priv.(*ecdsa.PrivateKey).ECDH()
				if err != nil {
					t.Fatal(err)
				}
				eph, err := ecdh.P256().NewPublicKey(v.C)
				if err != nil {
					t.Fatal(err)
				}
				if s, err = k.ECDH(eph); err != nil {
					t.Fatal(err)
				}
			}
			if !bytes.Equal(s, v.Secret) {
				t.Fatal("decrypting c does not give secret")
			}
			// B, spelled out.
			b := []byte("blindperso binding v1")
			b = append(b, byte(len(v.Profile)))
			b = append(b, v.Profile...)
			b = append(b, byte(len(v.IssuerSPKI)>>8), byte(len(v.IssuerSPKI)))
			b = append(b, v.IssuerSPKI...)
			if !bytes.Equal(b, v.Binding) {
				t.Fatal("binding is not label ‖ len ‖ profile ‖ len ‖ SPKI")
			}
			var ki []byte
			switch p.KDF {
			case SHA1:
				h := sha1.Sum(append(bytes.Clone(s), b...))
				ki = h[:16]
			case X963:
				h := sha1.Sum(append(append(bytes.Clone(s), 0, 0, 0, 1), b...))
				ki = h[:16]
			case AES:
				h := sha256.Sum256(b)
				if !bytes.Equal(h[:16], v.AESKDFInput) {
					t.Fatal("aes_kdf_input is not SHA-256(B)[0:16]")
				}
				ki = aesEncryptBlock(t, s, h[:16])
			case KBKDF:
				// SP 800-108r1 counter mode, one iteration:
				// HMAC-SHA256(S, u32be(1) ‖ label ‖ 00 ‖ B ‖ u32be(128)).
				m := []byte{0, 0, 0, 1}
				m = append(m, "blindperso kbkdf v1"...)
				m = append(m, 0x00)
				m = append(m, b...)
				m = append(m, 0, 0, 0, 128)
				if !bytes.Equal(m, v.KBKDFInput) {
					t.Fatal("kbkdf_input is not u32be(1) ‖ label ‖ 00 ‖ B ‖ u32be(128)")
				}
				h := hmac.New(sha256.New, s)
				h.Write(m)
				ki = h.Sum(nil)[:16]
			}
			if !bytes.Equal(ki, v.KI) {
				t.Fatal("k_i does not follow from secret and binding")
			}
			mac, err := AuthMAC(ki, v.CardID, v.Challenge)
			if err != nil || !bytes.Equal(mac, v.MAC) {
				t.Fatalf("mac does not verify: %v", err)
			}
		})
	}
}
