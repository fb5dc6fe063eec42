package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/pkcs11"

	"blindperso/hsm/hsmtest"
	"blindperso/protocol"
)

// replicaPair opens two fresh SoftHSM2 tokens (both made before either
// is opened: SoftHSM2 lists its tokens at C_Initialize).
func replicaPair(t *testing.T) (src, dst *Token, srcT, dstT hsmtest.Token) {
	t.Helper()
	srcT, dstT = hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	var err error
	if src, err = OpenURI(srcT.URI, 1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	if dst, err = OpenURI(dstT.URI, 1); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	return src, dst, srcT, dstT
}

// TestReplicate: replicable issuer keys (RSA and EC) and a replicable
// KEK made on one SoftHSM2 token are copied to another; every compared
// attribute is equal, the proofs hold, no session object is left on
// either side, the replicas are found as the issuer finds keys, audit
// clean, a card imported under both members gives the same blob, and
// the pair passes a token group's check at start (hsm.NewGroup).
func TestReplicate(t *testing.T) {
	ctx := context.Background()
	src, dst, srcT, dstT := replicaPair(t)
	rsaK, err := src.GenerateReplicableIssuerKey(ctx, KindRSA2048, "rep-rsa")
	if err != nil {
		t.Fatal(err)
	}
	ecK, err := src.GenerateReplicableIssuerKey(ctx, KindP256, "rep-ec")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := src.GenerateReplicableKEK(ctx, "rep-kek", srcT.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	if !rsaK.Replicable || !kek.Replicable || !kek.Trusted {
		t.Fatalf("replicable flags: %v %v %v", rsaK.Replicable, kek.Replicable, kek.Trusted)
	}
	if fs, err := src.Audit(ctx, []*IssuerKeyRef{rsaK, ecK}, kek, nil); err != nil || len(fs) != 0 {
		t.Fatalf("audit of the replicable keys: %v %v", fs, err)
	}
	nS, _ := src.CountObjects(ctx)
	nD, _ := dst.CountObjects(ctx)
	var tr *Transport
	res, err := Replicate(ctx, Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN,
		Keys: []*IssuerKeyRef{rsaK, ecK}, KEK: kek,
		// rep-ec has no profile named: it gets its kind's (ProofProfile).
		Profiles: map[string]protocol.Profile{"rep-rsa": protocol.RSAOAEPAES},
		Capture:  func(x *Transport) { tr = x }})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range res.Objects {
		t.Logf("%s %s: %v; history %v", o.What, o.Label, o.Attributes, o.History)
	}
	for _, p := range res.Proofs {
		t.Logf("proof %s: %s: %v", p.What, p.Method, p.Equal)
	}
	if len(res.Objects) != 5 || len(res.Proofs) != 6 {
		t.Errorf("%d objects, %d proofs; want 5 and 6", len(res.Objects), len(res.Proofs))
	}
	// A throwaway card's proof for every issuer key, named or not.
	for _, tc := range []struct{ label, profile string }{{"rep-rsa", "rsa-oaep-aes"}, {"rep-ec", "ecdh-p256-aes"}} {
		n := 0
		for _, p := range res.Proofs {
			if p.What == "issuer key "+tc.label+" and KEK rep-kek" && strings.Contains(p.Method, "profile "+tc.profile) && p.Equal {
				n++
			}
		}
		if n != 1 {
			t.Errorf("%s: %d card proofs with profile %s, want 1", tc.label, n, tc.profile)
		}
	}
	if n, _ := src.CountObjects(ctx); n != nS {
		t.Errorf("source: %d objects before, %d after", nS, n)
	}
	if n, _ := dst.CountObjects(ctx); n != nD+5 {
		t.Errorf("target: %d objects before, %d after; want 5 more (two key pairs and the KEK)", nD, n)
	}
	for _, o := range res.Objects {
		if o.What == "KEK" && o.Attributes["CKA_TRUSTED"] != "true" {
			t.Errorf("the KEK's replica: CKA_TRUSTED %s", o.Attributes["CKA_TRUSTED"])
		}
		if o.What == "issuer key (private)" && (o.Attributes["CKA_EXTRACTABLE"] != "true" || o.Attributes["CKA_WRAP_WITH_TRUSTED"] != "true" || o.Attributes["CKA_SENSITIVE"] != "true") {
			t.Errorf("replica %s: %v", o.Label, o.Attributes)
		}
	}
	if tr == nil || len(tr.WrappedTransport) != 384 || len(tr.Wrapped) != 3 {
		t.Fatalf("transport captured: %+v", tr)
	}
	// No transport object is left, and the captured handles are void.
	for _, side := range []struct {
		tok     *Token
		labels  []string
		handles []pkcs11.ObjectHandle
	}{{src, tr.SourceLabels, tr.SourceHandles}, {dst, tr.TargetLabels, tr.TargetHandles}} {
		for _, l := range side.labels {
			if used, err := side.tok.LabelInUse(ctx, l); err != nil || used {
				t.Errorf("%s: transport object %q left (%v)", side.tok.Info().Label, l, err)
			}
		}
		side.tok.With(ctx, func(s Session) error {
			for _, h := range side.handles {
				if _, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, nil)}); err == nil {
					t.Errorf("%s: transport handle %d still valid", side.tok.Info().Label, h)
				}
			}
			return nil
		})
	}

	// The replicas as the issuer finds them.
	rk, err := dst.FindIssuerKey(ctx, "rep-rsa")
	if err != nil {
		t.Fatal(err)
	}
	ek, err := dst.FindIssuerKey(ctx, "rep-ec")
	if err != nil {
		t.Fatal(err)
	}
	rkek, err := dst.FindKEK(ctx, "rep-kek")
	if err != nil {
		t.Fatal(err)
	}
	if !rk.Replicable || !rkek.Trusted || !rkek.Replicable || rk.Fingerprint() != rsaK.Fingerprint() || ek.Fingerprint() != ecK.Fingerprint() {
		t.Fatalf("found replicas: %+v %+v", rk, rkek)
	}
	if fs, err := dst.Audit(ctx, []*IssuerKeyRef{rk, ek}, rkek, nil); err != nil || len(fs) != 0 {
		t.Errorf("audit of the replicas: %v %v", fs, err)
	}
	// One throwaway card under each member: the same blob.
	for _, tc := range []struct {
		p        protocol.Profile
		key, rep *IssuerKeyRef
	}{{protocol.RSAOAEPAES, rsaK, rk}, {protocol.ECDHP256AES, ecK, ek}} {
		_, c, err := protocol.Encapsulate(tc.p, tc.key.Public, rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		a := &CardKeys{Token: src, Key: tc.key, KEK: kek}
		b := &CardKeys{Token: dst, Key: tc.rep, KEK: rkek}
		ba, err := a.Import(ctx, tc.p, c)
		if err != nil {
			t.Fatal(err)
		}
		bb, err := b.Import(ctx, tc.p, c)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(ba.Wrapped, bb.Wrapped) || ba.KEK != bb.KEK {
			t.Errorf("%s: blobs differ: %x / %x", tc.p.Name, ba.Wrapped, bb.Wrapped)
		}
		a.Close(ctx)
		b.Close(ctx)
	}
	// The pair is a token group: NewGroup's check at start (fingerprints,
	// a throwaway card's blob on each) accepts it, for both keys.
	for _, pair := range [][2]*IssuerKeyRef{{rsaK, rk}, {ecK, ek}} {
		g, err := NewGroup(ctx, []Member{{Token: src, Key: pair[0], KEK: kek}, {Token: dst, Key: pair[1], KEK: rkek}}, GroupOptions{})
		if err != nil {
			t.Fatalf("a group over the replicated pair (%s): %v", pair[0].Label, err)
		}
		g.Close(ctx)
	}
	// Again: every label is taken now, refused before anything is made.
	_, err = Replicate(ctx, Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN, Keys: []*IssuerKeyRef{rsaK}})
	if err == nil || !strings.Contains(err.Error(), "already exists in the target") {
		t.Errorf("second replication: %v", err)
	}
}

// TestReplicationRefusals: what CheckReplication refuses, before
// anything is made.
func TestReplicationRefusals(t *testing.T) {
	ctx := context.Background()
	src, dst, srcT, dstT := replicaPair(t)
	nss, err := OpenURI(hsmtest.NSS(t).URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer nss.Close()
	plain, err := src.GenerateIssuerKey(ctx, KindRSA2048, "ref-plain")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := src.GenerateReplicableIssuerKey(ctx, KindRSA2048, "ref-rep")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := nss.GenerateReplicableIssuerKey(ctx, KindRSA2048, "ref-nss"); !errors.Is(err, ErrReplicationRefused) {
		t.Errorf("replicable key on NSS: %v", err)
	}
	if _, err := nss.GenerateReplicableKEK(ctx, "ref-nss-kek", ""); !errors.Is(err, ErrReplicationRefused) {
		t.Errorf("replicable KEK on NSS: %v", err)
	}
	if used, _ := nss.LabelInUse(ctx, "ref-nss"); used {
		t.Error("NSS: the refused key was made")
	}
	ok := Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN, Keys: []*IssuerKeyRef{rep}}
	for _, tc := range []struct {
		name string
		r    func(Replication) Replication
		want string
	}{
		{"NSS target", func(r Replication) Replication { r.Target = nss; return r }, "does not enforce CKA_WRAP_WITH_TRUSTED"},
		{"same token", func(r Replication) Replication { r.Target = src; return r }, "the same token"},
		{"no source SO PIN", func(r Replication) Replication { r.SourceSOPIN = ""; return r }, "SO PIN"},
		{"not replicable", func(r Replication) Replication { r.Keys = []*IssuerKeyRef{plain}; return r }, "not replicable"},
		{"nothing to copy", func(r Replication) Replication { r.Keys = nil; return r }, "nothing to copy"},
	} {
		if err := CheckReplication(ctx, tc.r(ok)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
		}
	}
	if err := CheckReplication(ctx, ok); err != nil {
		t.Errorf("the good replication: %v", err)
	}
}

// TestTrustedWrappers: a trusted key that can wrap and has neither a
// wrap template nor a KEK's unwrap template carries a replicable issuer
// key out — shown first without the defence (an SO-made trusted key
// whose value the attacker's accomplice knows, as a KTK's receiver
// does), then closed with KTKWrapTemplate; UnsafeTrustedWrappers names
// the first and not the second, and a KTK imported by ImportKTK passes.
// A KEK made before KEK rotation existed (unwrap template {sensitive,
// not extractable}) is named too: a replicable key wrapped under it
// comes back decrypting.
func TestTrustedWrappers(t *testing.T) {
	ctx := context.Background()
	tt := hsmtest.SoftHSM(t)
	tok, err := OpenURI(tt.URI, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer tok.Close()
	sk, err := tok.GenerateReplicableIssuerKey(ctx, KindRSA2048, "tw-rsa")
	if err != nil {
		t.Fatal(err)
	}
	if fs, err := tok.UnsafeTrustedWrappers(ctx); err != nil || len(fs) != 0 {
		t.Fatalf("fresh token: %v %v", fs, err)
	}
	value := make([]byte, 32)
	rand.Read(value)
	for _, withTemplate := range []bool{false, true} {
		// The SO's trusted key is a public session object of the pool's
		// one session: it lives on after the SO's work.
		var h pkcs11.ObjectHandle
		err := tok.WithSO(ctx, tt.SOPIN, func(s Session) error {
			tmpl := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
				attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false), attr(pkcs11.CKA_LABEL, "tw-trusted"),
				attr(pkcs11.CKA_VALUE, value), attr(pkcs11.CKA_TRUSTED, true), attr(pkcs11.CKA_WRAP, true), attr(pkcs11.CKA_UNWRAP, false)}
			if withTemplate {
				wt, err := newCKATemplate(pkcs11.CKA_WRAP_TEMPLATE, KTKWrapTemplate)
				if err != nil {
					return err
				}
				defer wt.free()
				tmpl = append(tmpl, wt.attr)
			}
			var err error
			h, err = s.P.CreateObject(s.H, tmpl)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		fs, err := tok.UnsafeTrustedWrappers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if (len(fs) == 1) == withTemplate || len(fs) > 1 {
			t.Errorf("wrap template %v: findings %v", withTemplate, fs)
		}
		err = tok.With(ctx, func(s Session) error {
			defer s.P.DestroyObject(s.H, h)
			priv, err := sk.Handle(s)
			if err != nil {
				return err
			}
			w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_WRAP_PAD, nil)}, h, priv)
			switch {
			case withTemplate && !IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE):
				t.Errorf("with KTKWrapTemplate: C_WrapKey %v, want CKR_KEY_NOT_WRAPPABLE", err)
			case !withTemplate && (err != nil || len(w) < 1000):
				t.Errorf("without a wrap template: C_WrapKey %d bytes, %v: the attack should work", len(w), err)
			}
			t.Logf("wrap template %v: the replicable SK under the trusted key: %d bytes, %v", withTemplate, len(w), err)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	// ImportKTK gives its KTK the wrap template: not unsafe.
	ik, err := tok.GenerateKeyImportKey(ctx, "tw-ki")
	if err != nil {
		t.Fatal(err)
	}
	ktk := make([]byte, KTKLen)
	rand.Read(ktk)
	c, err := rsa.EncryptOAEP(sha1.New(), rand.Reader, ik.Public.RSA, ktk, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tok.ImportKTK(ctx, ik, "tw-ktk", c, tt.SOPIN); err != nil {
		t.Fatal(err)
	}
	if fs, err := tok.UnsafeTrustedWrappers(ctx); err != nil || len(fs) != 0 {
		t.Errorf("with a KTK of this version: %v %v", fs, err)
	}
	// An old-style KEK is unsafe, and the audit of the replicable key
	// says so.
	if err := MakeOldStyleKeys(ctx, tok, "tw-old", "tw-old-kek", tt.SOPIN); err != nil {
		t.Fatal(err)
	}
	fs, err := tok.UnsafeTrustedWrappers(ctx)
	if err != nil || len(fs) != 1 || fs[0].Label != "tw-old-kek" {
		t.Errorf("with an old-style KEK: %v %v", fs, err)
	}
	if fs, _ := tok.Audit(ctx, []*IssuerKeyRef{sk}, nil, nil); len(fs) != 1 || fs[0].Label != "tw-old-kek" {
		t.Errorf("audit of the replicable key beside an old-style KEK: %v", fs)
	}
}

// TestTransportWhileAlive: what the token itself stops while the
// transport objects live, for someone who has their handles — which no
// other process has, as they are session objects of the replicating
// process. The replication-import key cannot decrypt the transport blob,
// nor unwrap it into a readable key, nor into a token object (its
// CKA_UNWRAP_TEMPLATE); but a transport key unwrapped as that template
// allows can unwrap the captured issuer-key blob into a readable key: the
// token cannot force a CKA_UNWRAP_TEMPLATE onto the transport key from
// the replication-import key's (SoftHSM2 refuses nested templates). That
// path is closed only by the objects' being session objects of the
// ceremony process, destroyed at its end (docs/HSM.md).
func TestTransportWhileAlive(t *testing.T) {
	ctx := context.Background()
	src, dst, srcT, dstT := replicaPair(t)
	k, err := src.GenerateReplicableIssuerKey(ctx, KindRSA2048, "alive-rsa")
	if err != nil {
		t.Fatal(err)
	}
	r := Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN, Keys: []*IssuerKeyRef{k}}
	err = exclusivePair(ctx, src, dst, func(ps, pt *pooled) error {
		x := &replication{r: r, ps: ps, pt: pt, res: &ReplicationResult{}, tr: &Transport{Wrapped: map[string][]byte{}}}
		defer x.destroyTransport()
		if err := x.makeImportKey(); err != nil {
			return err
		}
		if err := x.makeTransport(); err != nil {
			return err
		}
		if err := x.wrapObjects(); err != nil {
			return err
		}
		s := x.dst()
		oaep := KeyImportOAEP()
		if err := s.P.DecryptInit(s.H, []*pkcs11.Mechanism{oaep}, x.rkiPriv); !IsRV(err, pkcs11.CKR_KEY_FUNCTION_NOT_PERMITTED) {
			t.Errorf("C_DecryptInit with the replication-import key: %v", err)
		}
		secret := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES)}
		readable := append(append([]*pkcs11.Attribute{}, secret...), attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true))
		if _, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{oaep}, x.rkiPriv, x.tr.WrappedTransport, readable); !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			t.Errorf("unwrap the transport key readable: %v", err)
		}
		var allowed, stored []*pkcs11.Attribute
		for typ, v := range TransportUnwrapTemplate {
			allowed = append(allowed, attr(typ, v))
			if typ == pkcs11.CKA_TOKEN {
				v = true
			}
			stored = append(stored, attr(typ, v))
		}
		if _, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{oaep}, x.rkiPriv, x.tr.WrappedTransport, forUnwrap(append(append([]*pkcs11.Attribute{}, secret...), stored...))); !IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			t.Errorf("unwrap the transport key as a token object: %v", err)
		}
		tk, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{oaep}, x.rkiPriv, x.tr.WrappedTransport, forUnwrap(append(append([]*pkcs11.Attribute{}, secret...), allowed...)))
		if err != nil {
			t.Fatalf("unwrap the transport key as the template allows: %v", err)
		}
		defer s.P.DestroyObject(s.H, tk)
		sk, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)}, tk, x.tr.Wrapped[k.Label], []*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA), attr(pkcs11.CKA_TOKEN, false),
			attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)})
		if err != nil {
			t.Fatalf("the in-process limit: unwrap the issuer key readable under a transport key without an unwrap template: %v (if the token refuses it, docs/HSM.md can say so)", err)
		}
		defer s.P.DestroyObject(s.H, sk)
		a, err := s.P.GetAttributeValue(s.H, sk, []*pkcs11.Attribute{attr(pkcs11.CKA_PRIVATE_EXPONENT, nil)})
		t.Logf("in-process limit: the issuer key's private exponent readable (%d bytes, %v) with the live transport objects' handles", len(a[0].Value), err)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestReplicateFails: a replication that fails half-way leaves nothing
// on either token — no replica, no transport object: a wrong SO PIN on
// the target (after the transport key crossed), and a source key whose
// attributes are not the key policy's (the replica, made with the
// policy, differs: compared and destroyed).
func TestReplicateFails(t *testing.T) {
	ctx := context.Background()
	src, dst, srcT, dstT := replicaPair(t)
	k, err := src.GenerateReplicableIssuerKey(ctx, KindRSA2048, "fail-rsa")
	if err != nil {
		t.Fatal(err)
	}
	kek, err := src.GenerateReplicableKEK(ctx, "fail-kek", srcT.SOPIN)
	if err != nil {
		t.Fatal(err)
	}
	// A replicable key that can sign: not the policy.
	odd := "fail-odd"
	err = src.With(ctx, func(s Session) error {
		var ts templates
		defer ts.free()
		mech, pubT, privT, err := issuerKeyTemplates(KindRSA2048, odd, newID(), s.M, &ts)
		if err != nil {
			return err
		}
		privT = replicableAttrs(privT)
		for i, a := range privT {
			if a.Type == pkcs11.CKA_SIGN {
				privT[i] = attr(pkcs11.CKA_SIGN, true)
			}
		}
		_, _, err = s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	oddK, err := src.FindIssuerKey(ctx, odd)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		r    Replication
		want string
	}{
		{"wrong target SO PIN", Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: "wrong-pin", Keys: []*IssuerKeyRef{k}, KEK: kek}, "CKR_PIN_INCORRECT"},
		{"source not the policy", Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN, Keys: []*IssuerKeyRef{k, oddK}, KEK: kek}, "CKA_SIGN is false, the source's true"},
		{"source not the policy: the replicas destroyed", Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN, Keys: []*IssuerKeyRef{k, oddK}, KEK: kek}, "(the replicas made were destroyed)"},
	} {
		nS, _ := src.CountObjects(ctx)
		nD, _ := dst.CountObjects(ctx)
		var tr *Transport
		tc.r.Capture = func(x *Transport) { tr = x }
		_, err := Replicate(ctx, tc.r)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, err, tc.want)
			continue
		}
		t.Logf("%s: %v", tc.name, err)
		if n, _ := src.CountObjects(ctx); n != nS {
			t.Errorf("%s: source %d objects before, %d after", tc.name, nS, n)
		}
		if n, _ := dst.CountObjects(ctx); n != nD {
			t.Errorf("%s: target %d objects before, %d after", tc.name, nD, n)
		}
		if tr == nil || len(tr.TargetLabels) == 0 {
			t.Fatalf("%s: no transport captured", tc.name)
		}
		for _, l := range append(tr.SourceLabels, tr.TargetLabels...) {
			for _, tok := range []*Token{src, dst} {
				if used, _ := tok.LabelInUse(ctx, l); used {
					t.Errorf("%s: %q left on %s", tc.name, l, tok.Info().Label)
				}
			}
		}
	}
}

// TestAuditReplicable: the audit judges an extractable key by the token:
// on SoftHSM2 a replicable key as hsm makes it has no finding, one
// without CKA_WRAP_WITH_TRUSTED has; on NSS softokn an extractable key
// is a finding whatever else it has, with the fix that says why.
func TestAuditReplicable(t *testing.T) {
	ctx := context.Background()
	soft, nss := hsmtest.SoftHSM(t), hsmtest.NSS(t)
	for _, tc := range []struct {
		ht        hsmtest.Token
		wwt       bool
		want      string // the finding's attribute, "" for none
		wantFixIn string
	}{
		{soft, true, "", ""},
		{soft, false, "CKA_WRAP_WITH_TRUSTED", ""},
		{nss, false, "CKA_EXTRACTABLE", "does not enforce CKA_WRAP_WITH_TRUSTED"},
	} {
		tok, err := OpenURI(tc.ht.URI, 1)
		if err != nil {
			t.Fatal(err)
		}
		label := fmt.Sprintf("audit-rep-%v", tc.wwt)
		err = tok.With(ctx, func(s Session) error {
			var ts templates
			defer ts.free()
			mech, pubT, privT, err := issuerKeyTemplates(KindRSA2048, label, newID(), s.M, &ts)
			if err != nil {
				return err
			}
			privT = replicableAttrs(privT)
			if !tc.wwt {
				var out []*pkcs11.Attribute
				for _, a := range privT {
					if a.Type != pkcs11.CKA_WRAP_WITH_TRUSTED {
						out = append(out, a)
					}
				}
				privT = out
			}
			_, _, err = s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, pubT, privT)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		k, err := tok.FindIssuerKey(ctx, label)
		if err != nil {
			t.Fatal(err)
		}
		fs, err := tok.Audit(ctx, []*IssuerKeyRef{k}, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s, CKA_WRAP_WITH_TRUSTED %v: %v", tok.Mechanisms().Name, tc.wwt, fs)
		switch {
		case !k.Replicable:
			t.Errorf("%s: the extractable key is not Replicable", tok.Mechanisms().Name)
		case tc.want == "" && len(fs) != 0, tc.want != "" && (len(fs) != 1 || fs[0].Attribute != tc.want || !strings.Contains(fs[0].Fix, tc.wantFixIn)):
			t.Errorf("%s, CKA_WRAP_WITH_TRUSTED %v: findings %v, want %s", tok.Mechanisms().Name, tc.wwt, fs, tc.want)
		}
		tok.DestroyLabel(ctx, label)
		tok.Close()
	}
}

// TestReplicateDestroyFails: a transport object the token will not
// destroy (C_DestroyObject fails on the source, through p11fault) fails
// the replication, and the session it lives in is closed, so that it dies
// with it: afterwards no transport label is left on the source, the
// captured handles are void, and the source works again with a new
// session.
func TestReplicateDestroyFails(t *testing.T) {
	ctx := context.Background()
	srcT, dstT := hsmtest.SoftHSM(t), hsmtest.SoftHSM(t)
	f := hsmtest.Faulty(t, srcT)
	src := openFaultToken(t, f.Token.URI, 1)
	dst := openFaultToken(t, dstT.URI, 1)
	k, err := src.GenerateReplicableIssuerKey(ctx, KindP256, "df-ec")
	if err != nil {
		t.Fatal(err)
	}
	nS, _ := src.CountObjects(ctx)
	nD, _ := dst.CountObjects(ctx)
	var tr *Transport
	f.Fail("C_DestroyObject", pkcs11.CKR_GENERAL_ERROR)
	_, err = Replicate(ctx, Replication{Source: src, Target: dst, SourceSOPIN: srcT.SOPIN, TargetSOPIN: dstT.SOPIN,
		Keys: []*IssuerKeyRef{k}, Capture: func(x *Transport) { tr = x }})
	f.Clear()
	if err == nil || !strings.Contains(err.Error(), "CKR_GENERAL_ERROR") || !strings.Contains(err.Error(), "the source's session was closed") {
		t.Fatalf("Replicate with C_DestroyObject failing on the source: %v", err)
	}
	t.Logf("refused: %v", err)
	if tr == nil || len(tr.SourceLabels) != 2 || len(tr.SourceHandles) != 2 {
		t.Fatalf("transport captured: %+v", tr)
	}
	for _, l := range tr.SourceLabels {
		if used, err := src.LabelInUse(ctx, l); err != nil || used {
			t.Errorf("source: transport object %q left (%v)", l, err)
		}
	}
	for _, l := range tr.TargetLabels {
		if used, err := dst.LabelInUse(ctx, l); err != nil || used {
			t.Errorf("target: transport object %q left (%v)", l, err)
		}
	}
	src.With(ctx, func(s Session) error {
		for _, h := range tr.SourceHandles {
			if _, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, nil)}); err == nil {
				t.Errorf("source: transport handle %d still valid", h)
			}
		}
		return nil
	})
	if n, _ := src.CountObjects(ctx); n != nS {
		t.Errorf("source: %d objects before, %d after", nS, n)
	}
	if n, _ := dst.CountObjects(ctx); n != nD {
		t.Errorf("target: %d objects before, %d after", nD, n)
	}
	if _, err := src.FindIssuerKey(ctx, "df-ec"); err != nil {
		t.Errorf("the source after its session was closed: %v", err)
	}
}
