package hsm

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// Test tokens for the chain tests: real SoftHSM2 and NSS softokn tokens
// (hsmtest), opened through the token layer (OpenURI, With), plus one
// "holder" session of the test's own that owns the test's session objects
// (the imported TEST issuer keys, the KEK), so that closing or recovering
// a pool session never takes them away.

const (
	kindSoftHSM2 = "SoftHSM2"
	kindNSS      = "NSS"
)

var testTokenKinds = []string{kindSoftHSM2, kindNSS}

type testToken struct {
	kind   string
	hs     hsmtest.Token
	tok    *Token
	p      *pkcs11.Ctx
	slot   uint
	holder pkcs11.SessionHandle
	kek    pkcs11.ObjectHandle
	// kekTrusted: the KEK has CKA_TRUSTED (set by the security officer).
	kekTrusted bool

	mu   sync.Mutex
	keys map[string]pkcs11.ObjectHandle // imported issuer keys by file
}

// openTestToken opens a fresh token of the given kind (SoftHSM2: a new
// token; NSS: the process's database) with a pool of n sessions, and a
// KEK in it. Everything is closed at the end of the test.
func openTestToken(tb testing.TB, kind string, n int) *testToken {
	tb.Helper()
	var hs hsmtest.Token
	switch kind {
	case kindSoftHSM2:
		hs = hsmtest.SoftHSM(tb)
	case kindNSS:
		hs = hsmtest.NSS(tb)
	default:
		tb.Fatalf("unknown token kind %q", kind)
	}
	tok, err := OpenURI(hs.URI, n)
	if err != nil {
		tb.Fatalf("open %s: %v", kind, err)
	}
	tt := &testToken{kind: kind, hs: hs, tok: tok, slot: tok.Info().Slot, keys: map[string]pkcs11.ObjectHandle{}}
	err = tok.With(context.Background(), func(s Session) error {
		tt.p = s.P
		var err error
		// Login state is per process: a new session is logged in already.
		tt.holder, err = s.P.OpenSession(tt.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
		return err
	})
	if err != nil {
		tok.Close()
		tb.Fatalf("%s: open the holder session: %v", kind, err)
	}
	tb.Cleanup(func() {
		tt.p.CloseSession(tt.holder) // destroys the test's session objects
		if err := tok.Close(); err != nil {
			tb.Errorf("close %s: %v", kind, err)
		}
	})
	tt.makeKEK(tb)
	return tt
}

// session is the holder session, for setup and audits.
func (tt *testToken) session() Session {
	return Session{P: tt.p, H: tt.holder, M: tt.tok.Mechanisms(), module: tt.tok.Info().Module}
}

// with runs fn in a pool session (the token layer).
func (tt *testToken) with(fn func(Session) error) error {
	return tt.tok.With(context.Background(), fn)
}

func testKEKTemplate(private, trusted bool) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		pkcs11.NewAttribute(pkcs11.CKA_VALUE_LEN, 32),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, private),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_WRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
		pkcs11.NewAttribute(pkcs11.CKA_ENCRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "blindperso test KEK"),
	}
	if trusted {
		t = append(t, pkcs11.NewAttribute(pkcs11.CKA_TRUSTED, true))
	}
	return t
}

// makeKEK generates the KEK: AES-256, sensitive, never extractable,
// wrap/unwrap only, a session object of the holder session.
//
// Where the token enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2) the KEK must
// be CKA_TRUSTED, which only the security officer can set — and SoftHSM2
// lets the SO create or modify only public (CKA_PRIVATE false) objects.
// So: the SO generates a public, trusted KEK; back as the user, a
// C_CopyObject with CKA_PRIVATE true makes the private copy (SoftHSM2
// copies CKA_TRUSTED with the other attributes and encrypts the value
// for the private object), and the public original is destroyed. The
// session stays open across the SO and user logins, so its session
// objects survive: a trusted session KEK is possible.
func (tt *testToken) makeKEK(tb testing.TB) {
	tb.Helper()
	gen := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)}
	if !tt.tok.Mechanisms().EnforcesWrapWithTrusted {
		k, err := tt.p.GenerateKey(tt.holder, gen, testKEKTemplate(true, false))
		if err != nil {
			tb.Fatalf("%s: generate KEK: %v", tt.kind, err)
		}
		tt.kek = k
		return
	}
	var public pkcs11.ObjectHandle
	err := tt.tok.WithSO(context.Background(), tt.hs.SOPIN, func(Session) error {
		var err error
		public, err = tt.p.GenerateKey(tt.holder, gen, testKEKTemplate(false, true))
		return err
	})
	if err != nil {
		tb.Fatalf("%s: SO generates a trusted KEK: %v", tt.kind, err)
	}
	k, err := tt.p.CopyObject(tt.holder, public, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true)})
	if err != nil {
		tb.Fatalf("%s: copy the trusted KEK to a private object: %v", tt.kind, err)
	}
	if err := tt.p.DestroyObject(tt.holder, public); err != nil {
		tb.Fatalf("%s: destroy the public KEK: %v", tt.kind, err)
	}
	tt.kek, tt.kekTrusted = k, true
}

// issuerKey imports a TEST issuer private key from testdata/keys into the
// token as a sensitive, non-extractable session object: unwrap only (RSA)
// or derive only (EC). Importing key material from the host is allowed in
// tests only; the issuer generates its keys in the token.
func (tt *testToken) issuerKey(tb testing.TB, file string) (pkcs11.ObjectHandle, error) {
	tt.mu.Lock()
	defer tt.mu.Unlock()
	if h, ok := tt.keys[file]; ok {
		return h, nil
	}
	tmpl := privateKeyTemplate(tb, file)
	h, err := tt.p.CreateObject(tt.holder, tmpl)
	if err != nil {
		return 0, err
	}
	tt.keys[file] = h
	return h, nil
}

// p256OID is the DER OBJECT IDENTIFIER prime256v1, CKA_EC_PARAMS.
var p256OID = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

func privateKeyTemplate(tb testing.TB, file string) []*pkcs11.Attribute {
	tb.Helper()
	pemBytes, err := os.ReadFile(filepath.Join("..", "testdata", file))
	if err != nil {
		tb.Fatal(err)
	}
	blk, _ := pem.Decode(pemBytes)
	if blk == nil {
		tb.Fatalf("%s: no PEM block", file)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		tb.Fatalf("%s: %v", file, err)
	}
	common := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY),
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
		pkcs11.NewAttribute(pkcs11.CKA_LABEL, "blindperso TEST issuer key "+file),
	}
	switch k := k.(type) {
	case *rsa.PrivateKey:
		k.Precompute()
		return append(common,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, k.N.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, beBytes(uint64(k.E))),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE_EXPONENT, k.D.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_1, k.Primes[0].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_PRIME_2, k.Primes[1].Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_1, k.Precomputed.Dp.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_EXPONENT_2, k.Precomputed.Dq.Bytes()),
			pkcs11.NewAttribute(pkcs11.CKA_COEFFICIENT, k.Precomputed.Qinv.Bytes()),
		)
	case *ecdsa.PrivateKey:
		ek, err := k.ECDH()
		if err != nil {
			tb.Fatalf("%s: %v", file, err)
		}
		return append(common,
			pkcs11.NewAttribute(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
			pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256OID),
			pkcs11.NewAttribute(pkcs11.CKA_VALUE, ek.Bytes()),
		)
	}
	tb.Fatalf("%s: unsupported key type %T", file, k)
	return nil
}

func beBytes(v uint64) []byte {
	var b []byte
	for ; v > 0; v >>= 8 {
		b = append([]byte{byte(v)}, b...)
	}
	return b
}

// sessionObjects lists the session objects the holder session can see
// (session objects are visible to every session of the process).
func (tt *testToken) sessionObjects(tb testing.TB) map[pkcs11.ObjectHandle]bool {
	tb.Helper()
	p, h := tt.p, tt.holder
	if err := p.FindObjectsInit(h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false)}); err != nil {
		tb.Fatalf("FindObjectsInit: %v", err)
	}
	defer p.FindObjectsFinal(h)
	out := map[pkcs11.ObjectHandle]bool{}
	for {
		hs, _, err := p.FindObjects(h, 100)
		if err != nil {
			tb.Fatalf("FindObjects: %v", err)
		}
		if len(hs) == 0 {
			return out
		}
		for _, o := range hs {
			out[o] = true
		}
	}
}

func testVectors(tb testing.TB) []protocol.Vector {
	tb.Helper()
	vs, err := protocol.ReadVectors(filepath.Join("..", "testdata", "vectors.json"))
	if err != nil {
		tb.Fatal(err)
	}
	return vs
}

func mustProfile(tb testing.TB, name string) protocol.Profile {
	tb.Helper()
	p, err := protocol.ProfileByName(name)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// generatedKey is an issuer key generated in the token, as the product
// makes it: private part sensitive and never extractable from birth.
type generatedKey struct {
	sk  pkcs11.ObjectHandle
	pub *protocol.IssuerKey
}

// generateIssuerKey makes an RSA-2048 (the token's exponent) or P-256 key
// pair in the holder session and returns the private handle and the
// public key in canonical SPKI form.
func (tt *testToken) generateIssuerKey(tb testing.TB, ec bool) generatedKey {
	tb.Helper()
	common := []*pkcs11.Attribute{
		pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
		pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true),
		pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
		pkcs11.NewAttribute(pkcs11.CKA_EXTRACTABLE, false),
		pkcs11.NewAttribute(pkcs11.CKA_SIGN, false),
		pkcs11.NewAttribute(pkcs11.CKA_DECRYPT, false),
	}
	var mech uint
	var pubT, privT []*pkcs11.Attribute
	if ec {
		mech = pkcs11.CKM_EC_KEY_PAIR_GEN
		pubT = []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false), pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, p256OID)}
		privT = append(common, pkcs11.NewAttribute(pkcs11.CKA_DERIVE, true), pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, false))
	} else {
		mech = pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN
		pubT = []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, false),
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS_BITS, 2048),
			pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, beBytes(uint64(tt.tok.Mechanisms().RSAExponent))),
		}
		privT = append(common, pkcs11.NewAttribute(pkcs11.CKA_UNWRAP, true), pkcs11.NewAttribute(pkcs11.CKA_DERIVE, false))
	}
	pub, priv, err := tt.p.GenerateKeyPair(tt.holder, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
	if err != nil {
		tb.Fatalf("%s: generate issuer key: %v", tt.kind, err)
	}
	defer tt.p.DestroyObject(tt.holder, pub)
	var key any
	if ec {
		a, err := tt.p.GetAttributeValue(tt.holder, pub, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_EC_POINT, nil)})
		if err != nil {
			tb.Fatal(err)
		}
		var point []byte
		if _, err := asn1.Unmarshal(a[0].Value, &point); err != nil {
			tb.Fatalf("CKA_EC_POINT is not a DER OCTET STRING: %v", err)
		}
		if key, err = ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point); err != nil {
			tb.Fatalf("CKA_EC_POINT: %v", err)
		}
	} else {
		a, err := tt.p.GetAttributeValue(tt.holder, pub, []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_MODULUS, nil), pkcs11.NewAttribute(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
		if err != nil {
			tb.Fatal(err)
		}
		key = &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: int(new(big.Int).SetBytes(a[1].Value).Int64())}
	}
	spki, err := x509.MarshalPKIXPublicKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	ik, err := protocol.ParseIssuerKey(spki)
	if err != nil {
		tb.Fatal(err)
	}
	return generatedKey{sk: priv, pub: ik}
}

// card is the card side in software (protocol's reference code): it
// draws S, encrypts it to the issuer key and keeps K_I — only to answer
// challenges with MACs, which is all the tests compare.
type softCard struct {
	id, c, ki []byte
}

func newSoftCard(tb testing.TB, p protocol.Profile, k *protocol.IssuerKey) softCard {
	tb.Helper()
	s, c, err := protocol.Encapsulate(p, k, rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	ki, err := protocol.DeriveKey(p, s, protocol.Binding(p, k.SPKI))
	if err != nil {
		tb.Fatal(err)
	}
	id := make([]byte, 8)
	rand.Read(id)
	return softCard{id: id, c: c, ki: ki}
}

func (c softCard) answer(tb testing.TB, challenge []byte) []byte {
	tb.Helper()
	mac, err := protocol.AuthMAC(c.ki, c.id, challenge)
	if err != nil {
		tb.Fatal(err)
	}
	return mac
}
