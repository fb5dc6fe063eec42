package hsm

import (
	"fmt"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// The product's invariant, tested on real tokens: everything a chain
// creates is a sensitive session object that cannot be read, the
// intermediates can only feed the next derivation and cannot leave the
// token at all, and K_I can leave it only wrapped (under a trusted KEK
// where the token enforces CKA_WRAP_WITH_TRUSTED).

// attrs reads boolean and CK_ULONG attributes one by one (a token that
// does not know one answers CKR_ATTRIBUTE_TYPE_INVALID for it alone).
func readAttrs(tb testing.TB, s Session, h pkcs11.ObjectHandle, types ...uint) map[uint]any {
	tb.Helper()
	out := map[uint]any{}
	for _, t := range types {
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(t, nil)})
		if err != nil {
			out[t] = err
			continue
		}
		switch v := a[0].Value; len(v) {
		case 1:
			out[t] = v[0] != 0
		default:
			n, err := ckULong(v)
			if err != nil {
				out[t] = err
			} else {
				out[t] = n
			}
		}
	}
	return out
}

// wantIntermediate and wantCardKey are the audited attributes of what a
// chain makes. CKA_NEVER_EXTRACTABLE is checked separately: PKCS#11 makes
// it false for every unwrapped key and inherits it on derivation.
var (
	wantCommon = map[uint]any{
		pkcs11.CKA_CLASS: uint64(pkcs11.CKO_SECRET_KEY), pkcs11.CKA_TOKEN: false, pkcs11.CKA_PRIVATE: true,
		pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false,
		pkcs11.CKA_VERIFY: false, pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false,
	}
	wantIntermediate = mergeAttrs(wantCommon, map[uint]any{pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_DERIVE: true,
		pkcs11.CKA_WRAP_WITH_TRUSTED: true})
	wantCardKey = mergeAttrs(wantCommon, map[uint]any{
		pkcs11.CKA_KEY_TYPE: uint64(pkcs11.CKK_AES), pkcs11.CKA_VALUE_LEN: uint64(protocol.KeySize),
		pkcs11.CKA_EXTRACTABLE: true, pkcs11.CKA_DERIVE: false, pkcs11.CKA_WRAP_WITH_TRUSTED: true,
	})
)

func mergeAttrs(a, b map[uint]any) map[uint]any {
	m := map[uint]any{}
	for k, v := range a {
		m[k] = v
	}
	for k, v := range b {
		m[k] = v
	}
	return m
}

func attrTypes(m map[uint]any) []uint {
	var k []uint
	for t := range m {
		k = append(k, t)
	}
	return k
}

// checkAttrs compares what the token reports with want; every mismatch is
// one line.
func checkAttrs(tb testing.TB, what string, got, want map[uint]any) {
	tb.Helper()
	for t, w := range want {
		if fmt.Sprint(got[t]) != fmt.Sprint(w) {
			tb.Errorf("%s: %s = %v, want %v", what, AttrName(t), got[t], w)
		}
	}
}

// checkUnreadable asserts that the token refuses to reveal the value.
func checkUnreadable(tb testing.TB, what string, s Session, h pkcs11.ObjectHandle) {
	tb.Helper()
	_, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_VALUE, nil)})
	if !IsRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		tb.Errorf("%s: reading CKA_VALUE gave %v, want CKR_ATTRIBUTE_SENSITIVE", what, err)
	}
}

// kbkdfKIExtractable is CKA_EXTRACTABLE of the K_I that the kbkdf step
// makes, where the token decides it (step.extractableByToken).
var kbkdfKIExtractable = map[string]bool{kindNSS: false}

// derivedNeverExtractableFalse marks tokens that report
// CKA_NEVER_EXTRACTABLE false on every derived key, against PKCS#11.
var derivedNeverExtractableFalse = map[string]bool{kindNSS: true}

// TestChainObjectAttributes runs every chain each token can run, from
// issuer keys generated in the token (as the product makes them) and a
// software card, audits every object the chain makes while it exists
// (through auditStep) and checks, by listing the session objects before
// and after, that the chain leaves exactly K_I behind and that destroying
// K_I leaves nothing. The card's MAC must verify under the result.
func TestChainObjectAttributes(t *testing.T) {
	for _, kind := range testTokenKinds {
		t.Run(kind, func(t *testing.T) {
			tt := openTestToken(t, kind, 1)
			keys := map[bool]generatedKey{false: tt.generateIssuerKey(t, false), true: tt.generateIssuerKey(t, true)}
			for _, name := range briefRunnable[kind] {
				p := mustProfile(t, name)
				t.Run(p.Name, func(t *testing.T) { auditChain(t, tt, p, keys[p.Transport == protocol.ECDHP256]) })
			}
		})
	}
}

func auditChain(t *testing.T, tt *testToken, p protocol.Profile, key generatedKey) {
	s := tt.session()
	card := newSoftCard(t, p, key.pub)
	chain, _ := chainFor(p)
	seen := map[pkcs11.ObjectHandle]bool{}
	parentNE := readAttrs(t, s, key.sk, pkcs11.CKA_NEVER_EXTRACTABLE)[pkcs11.CKA_NEVER_EXTRACTABLE] == true
	if !parentNE {
		t.Errorf("the generated issuer key is not CKA_NEVER_EXTRACTABLE")
	}
	auditStep = func(s Session, _ protocol.Profile, i int, h pkcs11.ObjectHandle) {
		seen[h] = true
		st := chain[i]
		final := i == len(chain)-1
		what := fmt.Sprintf("step %d (%s)", i+1, st.name)
		want := mergeAttrs(wantIntermediate, map[uint]any{pkcs11.CKA_KEY_TYPE: uint64(st.keyType)})
		if st.lenByWrap(s.M) {
			// S, on a token that does not report its length: extractable
			// under trusted keys only, for the length check (checkLen).
			want = mergeAttrs(want, map[uint]any{pkcs11.CKA_EXTRACTABLE: true})
		}
		if final {
			want = wantCardKey
			if st.extractableByToken {
				// The token chose (DeriveCardKey): NSS softokn makes
				// this K_I non-extractable, like S. It is wrapped below.
				want = mergeAttrs(want, map[uint]any{pkcs11.CKA_EXTRACTABLE: kbkdfKIExtractable[tt.kind]})
			}
		}
		// CKA_NEVER_EXTRACTABLE (PKCS#11 v2.40, C_UnwrapKey and
		// C_DeriveKey): false after an unwrap; after a derivation, the
		// base key's value and-ed with "not extractable". So: true for
		// Z derived from a never-extractable EC key, false for anything
		// unwrapped from c and for the extractable K_I.
		// NSS softokn 3.87 does not follow this: it reports false for
		// every derived key (CKA_EXTRACTABLE false is what stops
		// extraction; CKA_NEVER_EXTRACTABLE is only its history).
		ne := st.op == opDerive && parentNE && !final && !derivedNeverExtractableFalse[tt.kind]
		want = mergeAttrs(want, map[uint]any{pkcs11.CKA_NEVER_EXTRACTABLE: ne})
		got := readAttrs(t, s, h, append(attrTypes(want), pkcs11.CKA_ALWAYS_SENSITIVE)...)
		checkAttrs(t, what, got, want)
		checkUnreadable(t, what, s, h)
		parentNE = ne
	}
	defer func() { auditStep = nil }()

	before := tt.sessionObjects(t)
	ki, err := DeriveCardKey(s, p, key.sk, tt.kek, key.pub.SPKI, card.c)
	if err != nil {
		t.Fatal(err)
	}
	if len(seen) != len(chain) {
		t.Errorf("the chain made %d objects, want %d (one per step)", len(seen), len(chain))
	}
	after := tt.sessionObjects(t)
	for h := range after {
		if !before[h] && h != ki {
			t.Errorf("object %d left behind by the chain", h)
		}
	}
	if !after[ki] {
		t.Errorf("K_I %d is not among the session objects", ki)
	}
	checkUnreadable(t, "K_I", s, ki)

	blob, err := WrapCardKey(s, tt.kek, ki)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.P.DestroyObject(s.H, ki); err != nil {
		t.Fatal(err)
	}
	if n := len(tt.sessionObjects(t)); n != len(before) {
		t.Errorf("%d session objects after destroying K_I, want %d", n, len(before))
	}
	challenge := make([]byte, protocol.ChallengeLen)
	if ok, err := VerifyCardMAC(s, tt.kek, blob, card.id, challenge, card.answer(t, challenge)); !ok || err != nil {
		t.Errorf("the card's MAC does not verify under the derived K_I: %v, %v", ok, err)
	}
}
