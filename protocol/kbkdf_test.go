package protocol

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// opensslKBKDF is the independent computation the kbkdf KDF is checked
// against: OpenSSL's KBKDF (EVP_KDF-KB) in counter mode with HMAC-SHA256,
// key K_IN, salt = SP 800-108 Label, info = Context, with the optional [L]
// and zero separator on (stated, though they are OpenSSL's defaults).
func opensslKBKDF(t *testing.T, key, label, context []byte, bytesOut int) []byte {
	t.Helper()
	args := []string{"kdf", "-keylen", strconv.Itoa(bytesOut),
		"-kdfopt", "mode:counter", "-kdfopt", "mac:HMAC", "-kdfopt", "digest:SHA256",
		"-kdfopt", "use-l:1", "-kdfopt", "use-separator:1",
		"-kdfopt", "hexkey:" + hex.EncodeToString(key)}
	// openssl refuses an empty hexsalt/hexinfo value: leave them out.
	if len(label) > 0 {
		args = append(args, "-kdfopt", "hexsalt:"+hex.EncodeToString(label))
	}
	if len(context) > 0 {
		args = append(args, "-kdfopt", "hexinfo:"+hex.EncodeToString(context))
	}
	out, err := exec.Command("openssl", append(args, "KBKDF")...).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl kdf: %v\n%s", err, out)
	}
	b, err := hex.DecodeString(strings.ReplaceAll(strings.TrimSpace(string(out)), ":", ""))
	if err != nil {
		t.Fatalf("openssl kdf output %q: %v", out, err)
	}
	return b
}

func needOpenSSL(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("no openssl")
	}
}

// Every kbkdf vector's K_I is what OpenSSL's KBKDF derives from the
// vector's S, the label and B: docs/PROTOCOL.md §3.3's byte layout is
// OpenSSL's.
func TestKBKDFVectorsAgainstOpenSSL(t *testing.T) {
	needOpenSSL(t)
	vs, err := ReadVectors(vectorsFile)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, v := range vs {
		p, err := ProfileByName(v.Profile)
		if err != nil {
			t.Fatal(err)
		}
		if p.KDF != KBKDF {
			continue
		}
		n++
		got := opensslKBKDF(t, v.Secret, []byte(KBKDFLabel), v.Binding, KeySize)
		if !bytes.Equal(got, v.KI) {
			t.Errorf("%s: openssl KBKDF gives %x, the vector's k_i is %x", v.Name, got, []byte(v.KI))
		}
	}
	if n < 2 {
		t.Fatalf("%d kbkdf vectors, want one per kbkdf profile at least", n)
	}
}

// The counter-mode KDF as written from SP 800-108r1 agrees with OpenSSL
// for random keys, labels and contexts, and lengths of one block, less,
// more and many (n > 1: the counter goes up).
func TestCounterKDFAgainstOpenSSL(t *testing.T) {
	needOpenSSL(t)
	rnd := func(n int) []byte {
		b := make([]byte, n)
		rand.Read(b)
		return b
	}
	for _, tc := range []struct{ keyLen, labelLen, contextLen, bits int }{
		{32, 19, 300, 128},
		{32, 19, 65, 8},
		{32, 1, 1, 256},
		{16, 7, 9, 264},
		{65, 3, 200, 1024}, // key longer than SHA-256's block: hashed first
		{32, 0, 40, 384},
		{32, 40, 0, 128},
	} {
		key, label, context := rnd(tc.keyLen), rnd(tc.labelLen), rnd(tc.contextLen)
		got, err := CounterKDFHMACSHA256(key, label, context, tc.bits)
		if err != nil {
			t.Fatal(err)
		}
		if want := opensslKBKDF(t, key, label, context, tc.bits/8); !bytes.Equal(got, want) {
			t.Errorf("%+v: %x, openssl %x", tc, got, want)
		}
	}
	for _, bits := range []int{0, -8, 12} {
		if _, err := CounterKDFHMACSHA256(rnd(32), nil, nil, bits); err == nil {
			t.Errorf("L = %d accepted", bits)
		}
	}
}

// The kbkdf profiles' identifiers are frozen (PROTOCOL.md §3).
func TestKBKDFProfiles(t *testing.T) {
	for _, tc := range []struct {
		p    Profile
		id   byte
		name string
		tr   Transport
	}{
		{RSAOAEPKBKDF, 0x06, "rsa-oaep-kbkdf", RSAOAEP},
		{ECDHP256KBKDF, 0x07, "ecdh-p256-kbkdf", ECDHP256},
	} {
		if tc.p.ID != tc.id || tc.p.Name != tc.name || tc.p.Transport != tc.tr || tc.p.KDF != KBKDF {
			t.Errorf("profile %+v, want id %#x name %s", tc.p, tc.id, tc.name)
		}
	}
	if len(KBKDFLabel) != 19 {
		t.Errorf("KBKDFLabel is %d bytes, PROTOCOL.md says 19", len(KBKDFLabel))
	}
	b := Binding(RSAOAEPKBKDF, []byte{1, 2, 3})
	m := KBKDFInput(b)
	if len(m) != 4+19+1+len(b)+4 || !bytes.HasPrefix(m, []byte{0, 0, 0, 1}) || !bytes.HasSuffix(m, []byte{0, 0, 0, 0x80}) {
		t.Errorf("KBKDFInput = %x", m)
	}
	// S of another length than 32 is refused, as for aes.
	if _, err := DeriveKey(RSAOAEPKBKDF, make([]byte, 16), b); err == nil {
		t.Error("a 16-byte S accepted")
	}
	// A different B (profile or key) gives a different K_I.
	s := make([]byte, 32)
	k1, _ := DeriveKey(RSAOAEPKBKDF, s, b)
	k2, _ := DeriveKey(RSAOAEPKBKDF, s, Binding(RSAOAEPKBKDF, []byte{1, 2, 4}))
	k3, _ := DeriveKey(RSAOAEPKBKDF, s, Binding(RSAOAEPAES, []byte{1, 2, 3}))
	if len(k1) != KeySize || bytes.Equal(k1, k2) || bytes.Equal(k1, k3) {
		t.Error("kbkdf does not separate B")
	}
}
