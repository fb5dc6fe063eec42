package hsm

import (
	"bytes"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// runnable is the brief's measured matrix (DESIGN.md §2–3): the profiles
// each token runs in-token. The tests derive every vector on every token
// and require exactly this.
var briefRunnable = map[string][]string{
	kindSoftHSM2: {"rsa-oaep-aes", "ecdh-p256-aes"},
	// NSS softokn also runs CKM_SP800_108_COUNTER_KDF (DESIGN.md §11).
	kindNSS: {"rsa-raw-sha1", "rsa-oaep-sha1", "rsa-oaep-aes", "ecdh-p256-x963", "ecdh-p256-aes",
		"rsa-oaep-kbkdf", "ecdh-p256-kbkdf"},
}

// vectorExceptions are vectors of a runnable profile that the token still
// cannot run, with the reason.
var vectorExceptions = map[string]map[string]string{
	kindNSS: {
		// NSC_UnwrapKey refuses secret keys longer than its MAX_KEY_LEN
		// (256 bytes) with CKR_TEMPLATE_INCONSISTENT; rsa-raw's S is the
		// whole k-byte block, 384 bytes for RSA-3072.
		"rsa-raw-sha1/rsa3072": "NSS softokn unwraps secrets of at most 256 bytes",
	},
}

func expectRunnable(kind, vector string) bool {
	profile, _, _ := strings.Cut(vector, "/")
	if _, no := vectorExceptions[kind][vector]; no {
		return false
	}
	return slices.Contains(briefRunnable[kind], profile)
}

// The return codes with which a token refuses a step it cannot do.
var cannotRun = []uint{pkcs11.CKR_MECHANISM_INVALID, pkcs11.CKR_MECHANISM_PARAM_INVALID, pkcs11.CKR_TEMPLATE_INCONSISTENT}

// TestDeriveVectors is the issuer half of every test vector on every
// token: import the TEST private key, derive K_I from the vector's c,
// wrap it, and verify the vector's MAC in the token. A flipped MAC byte,
// another challenge or another card Id must not verify. The set of
// (token, profile) pairs that run must be the brief's.
func TestDeriveVectors(t *testing.T) {
	for _, kind := range testTokenKinds {
		t.Run(kind, func(t *testing.T) {
			tt := openTestToken(t, kind, 2)
			ran := map[string]bool{}
			for _, v := range testVectors(t) {
				t.Run(v.Name, func(t *testing.T) {
					if deriveVector(t, tt, v) {
						ran[v.Profile] = true
					}
				})
			}
			got := sortedKeys(ran)
			want := slices.Sorted(slices.Values(briefRunnable[kind]))
			if !slices.Equal(got, want) {
				t.Errorf("%s runs %v, the brief says %v", kind, got, want)
			}
		})
	}
}

// deriveVector runs one vector and reports whether the token could.
func deriveVector(t *testing.T, tt *testToken, v protocol.Vector) bool {
	p := mustProfile(t, v.Profile)
	sk, err := tt.issuerKey(t, v.IssuerKeyFile)
	if err != nil {
		t.Fatalf("import the TEST issuer key %s: %v", v.IssuerKeyFile, err)
	}
	before := len(tt.sessionObjects(t))
	var blob Blob
	err = tt.with(func(s Session) error {
		var err error
		blob, err = ImportCard(s, p, sk, tt.kek, v.IssuerSPKI, v.C)
		return err
	})
	if n := len(tt.sessionObjects(t)); n != before {
		t.Errorf("%d session objects after the import, want %d", n, before)
	}
	want := expectRunnable(tt.kind, v.Name)
	if err != nil {
		if want {
			t.Fatalf("import: %v", err)
		}
		if !slices.ContainsFunc(cannotRun, func(rv uint) bool { return IsRV(err, rv) }) {
			t.Errorf("import failed, but not as a token that cannot run the chain: %v", err)
		}
		t.Logf("not runnable, as expected: %v", Explain(err))
		return false
	}
	if !want {
		t.Errorf("the import worked, but %s is not expected to run %s", tt.kind, v.Name)
	}
	if blob.Scheme != WrapRFC5649 || blob.Mechanism != tt.tok.Mechanisms().KeyWrapRFC5649 || len(blob.Wrapped) != 24 {
		t.Errorf("blob = %+v, want scheme %s, mechanism 0x%X, 24 bytes", blob, WrapRFC5649, tt.tok.Mechanisms().KeyWrapRFC5649)
	}

	flipped := bytes.Clone(v.MAC)
	flipped[len(flipped)-1] ^= 0x01
	otherChallenge := bytes.Clone(v.Challenge)
	otherChallenge[0] ^= 0x80
	otherID := append(bytes.Clone(v.CardID), 0)
	for _, c := range []struct {
		name          string
		id, chal, mac []byte
		want          bool
	}{
		{"the card's MAC", v.CardID, v.Challenge, v.MAC, true},
		{"a flipped MAC bit", v.CardID, v.Challenge, flipped, false},
		{"another challenge", v.CardID, otherChallenge, v.MAC, false},
		{"another card Id", otherID, v.Challenge, v.MAC, false},
		{"a truncated MAC", v.CardID, v.Challenge, v.MAC[:15], false},
	} {
		var ok bool
		err := tt.with(func(s Session) error {
			var err error
			ok, err = VerifyCardMAC(s, tt.kek, blob, c.id, c.chal, c.mac)
			return err
		})
		if err != nil || ok != c.want {
			t.Errorf("verify %s = %v, %v; want %v", c.name, ok, err, c.want)
		}
	}
	if n := len(tt.sessionObjects(t)); n != before {
		t.Errorf("%d session objects after the verifications, want %d", n, before)
	}
	return true
}

func sortedKeys(m map[string]bool) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	sort.Strings(k)
	return k
}

// TestChainTables checks the tables against docs/PROTOCOL.md §3.4: one
// chain per profile, ending in an AES-128 K_I, the first step taking c.
func TestChainTables(t *testing.T) {
	for _, p := range protocol.Profiles() {
		c, err := chainFor(p)
		if err != nil {
			t.Fatal(err)
		}
		last := c[len(c)-1]
		if last.keyType != pkcs11.CKK_AES || last.valueLen != protocol.KeySize {
			t.Errorf("%s: the last step makes key type %d of %d bytes, want AES-128", p.Name, last.keyType, last.valueLen)
		}
		if first := c[0]; first.data != inC && first.param != paramECDH {
			t.Errorf("%s: the first step does not take c", p.Name)
		}
		steps, err := ChainSteps(p)
		if err != nil || len(steps) != len(c) {
			t.Errorf("%s: ChainSteps = %v, %v", p.Name, steps, err)
		}
	}
	if _, err := chainFor(protocol.Profile{Name: "rsa-oaep-sp800-108"}); err == nil {
		t.Error("a profile without a chain was accepted")
	}
}
