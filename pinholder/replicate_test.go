package pinholder

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"math/big"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/hsm/hsmtest"
)

// TestReplicatedPair: throwaway keys made replicable on one SoftHSM2
// member and replicated to another, as the ceremony does, and the
// adversary on both members — every path against the source's keys on
// the first, against the replicas on the second, and the replication's
// transport as it crossed the host on both. No path opens that is not
// open on a token without replication (the table's OpenPaths); the
// transport paths are closed because nothing of the transport is left;
// no object is left on either token.
func TestReplicatedPair(t *testing.T) {
	ctx := context.Background()
	at, bt := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	a, err := hsm.OpenURI(at.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := hsm.OpenURI(bt.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	for _, tc := range []struct {
		name       string
		tok, peer  *hsm.Token
		ht, peerHT hsmtest.Token
		isSource   bool
	}{
		{"source member", a, b, at, bt, false},
		{"receiving member", b, a, bt, at, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			na, _ := a.CountObjects(ctx)
			nb, _ := b.CountObjects(ctx)
			rep, err := Run(ctx, tc.tok, Options{UserPIN: tc.ht.PIN, SOPIN: tc.ht.SOPIN, Peer: tc.peer, PeerSOPIN: tc.peerHT.SOPIN, PeerIsSource: tc.isSource})
			if err != nil {
				t.Fatal(err)
			}
			var sb strings.Builder
			rep.WriteText(&sb)
			t.Log(sb.String())
			if got, want := rep.OpenIDs(), tc.tok.Mechanisms().OpenPaths; !slices.Equal(got, want) {
				t.Errorf("open paths %v, a token without replication has %v", got, want)
			}
			checkSkipped(t, rep, tc.tok, true, true)
			for _, r := range rep.Results {
				if r.Tried && !r.Open && !strings.HasPrefix(r.Refusal, "CKR_") {
					t.Errorf("%s: closed without the token's refusal: %q", r.ID, r.Refusal)
				}
				if (r.ID == RepImportKeyLeftover || r.ID == RepTransportLeftover) && (!r.Tried || !strings.HasSuffix(r.Refusal, "HANDLE_INVALID") || !strings.Contains(r.Detail, "none found by label")) {
					t.Errorf("%s: %+v, want closed: nothing of the transport left", r.ID, r)
				}
			}
			if n, _ := a.CountObjects(ctx); n != na {
				t.Errorf("member A: %d objects before, %d after", na, n)
			}
			if n, _ := b.CountObjects(ctx); n != nb {
				t.Errorf("member B: %d objects before, %d after", nb, n)
			}
		})
	}
}

// TestReplicableDefences: the attack on a replicable key first works
// without the defence — an extractable issuer key without
// CKA_WRAP_WITH_TRUSTED on SoftHSM2, an extractable one with it on NSS
// softokn, which does not enforce it — and is closed with it (the
// replicable key as hsm makes it on SoftHSM2); and hsm refuses to make a
// replicable key on NSS.
func TestReplicableDefences(t *testing.T) {
	ctx := context.Background()
	soft, nss := hsmtest.SoftHSM(t), hsmtest.NSS(t)
	for _, tc := range []struct {
		ht      hsmtest.Token
		wwt     bool
		hsmMade bool // made by hsm.GenerateReplicableIssuerKey
		open    bool
	}{
		{soft, false, false, true}, // without CKA_WRAP_WITH_TRUSTED: taken out
		{soft, true, true, false},  // the replicable key: CKR_KEY_NOT_WRAPPABLE
		{nss, true, false, true},   // NSS does not enforce it: taken out
	} {
		tok, err := hsm.OpenURI(tc.ht.URI, 1)
		if err != nil {
			t.Fatal(err)
		}
		name := tok.Mechanisms().Name
		label := "defence-" + strings.ReplaceAll(name, " ", "-")
		if tc.hsmMade {
			if _, err := tok.GenerateReplicableIssuerKey(ctx, hsm.KindRSA2048, label); err != nil {
				t.Fatal(err)
			}
		} else {
			err := tok.With(ctx, func(s hsm.Session) error { return extractableKey(s, label, tc.wwt) })
			if err != nil {
				t.Fatal(err)
			}
		}
		var got string
		err = tok.With(ctx, func(s hsm.Session) error {
			e := &env{tok: tok}
			defer func() {
				for _, h := range e.made {
					s.P.DestroyObject(s.H, h)
				}
				destroyOwn(s)
			}()
			h, err := findLabel(s, label, pkcs11.CKO_PRIVATE_KEY)
			if err != nil {
				return err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return err
			}
			out, err := e.wrapOut(s, own, val, h)
			var r *refusal
			switch {
			case errors.As(err, &r):
				got = "closed: " + r.rv
				return nil
			case err != nil:
				return err
			}
			got = "OPEN"
			return samePrivate(s, h, out)
		})
		if err != nil {
			t.Fatalf("%s (CKA_WRAP_WITH_TRUSTED %v): %v", name, tc.wwt, err)
		}
		t.Logf("%s, extractable, CKA_WRAP_WITH_TRUSTED %v: %s", name, tc.wwt, got)
		if (got == "OPEN") != tc.open || !tc.open && got != "closed: CKR_KEY_NOT_WRAPPABLE" {
			t.Errorf("%s, CKA_WRAP_WITH_TRUSTED %v: %s", name, tc.wwt, got)
		}
		if _, err := tok.GenerateReplicableIssuerKey(ctx, hsm.KindRSA2048, label+"-hsm"); (err == nil) != (name == "SoftHSM2") ||
			err != nil && !errors.Is(err, hsm.ErrReplicationRefused) {
			t.Errorf("%s: GenerateReplicableIssuerKey: %v", name, err)
		}
		tok.DestroyLabel(ctx, label)
		tok.DestroyLabel(ctx, label+"-hsm")
		tok.Close()
	}
}

// extractableKey makes an RSA-2048 key pair as the issuer key is made
// (read-only, unwrap only) but extractable, with CKA_WRAP_WITH_TRUSTED
// as wwt says: the weak key of the defence test.
func extractableKey(s hsm.Session, label string, wwt bool) error {
	pub := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_MODULUS_BITS, 2048),
		attr(pkcs11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}), attr(pkcs11.CKA_ENCRYPT, false), attr(pkcs11.CKA_VERIFY, true), attr(pkcs11.CKA_WRAP, false)}
	priv := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_LABEL, label),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_UNWRAP, true),
		attr(pkcs11.CKA_DECRYPT, false), attr(pkcs11.CKA_SIGN, true), attr(pkcs11.CKA_DERIVE, false)}
	if wwt {
		priv = append(priv, attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true))
	}
	_, _, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)}, pub, priv)
	return err
}

func findLabel(s hsm.Session, label string, class uint) (pkcs11.ObjectHandle, error) {
	if err := s.P.FindObjectsInit(s.H, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_CLASS, class)}); err != nil {
		return 0, err
	}
	hs, _, err := s.P.FindObjects(s.H, 2)
	s.P.FindObjectsFinal(s.H)
	if err != nil || len(hs) != 1 {
		return 0, errors.New("key not found")
	}
	return hs[0], nil
}

// samePrivate checks that out (a PKCS#8 key, perhaps padded) is the
// private key h: the same modulus.
func samePrivate(s hsm.Session, h pkcs11.ObjectHandle, out []byte) error {
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(out, &raw); err != nil {
		return err
	}
	k, err := x509.ParsePKCS8PrivateKey(raw.FullBytes)
	if err != nil {
		return err
	}
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_MODULUS, nil)})
	if err != nil {
		return err
	}
	if rk, ok := k.(*rsa.PrivateKey); !ok || rk.N.Cmp(new(big.Int).SetBytes(a[0].Value)) != 0 {
		return errors.New("the wrapped key is not the key attacked")
	}
	return nil
}
