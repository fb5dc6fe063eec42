package hsm

import (
	"context"
	"testing"

	"github.com/miekg/pkcs11"
)

// TestAudit: keys made by this package pass the audit on both tokens;
// keys made the way the project made them before (modifiable, no unwrap
// template, usages left to the token's defaults) let a PIN holder switch
// CKA_DECRYPT on — the attack working — and the audit names them.
func TestAudit(t *testing.T) {
	ctx := context.Background()
	for name, tok := range openBoth(t, 1) {
		t.Run(name, func(t *testing.T) {
			rsaKey, err := tok.GenerateIssuerKey(ctx, KindRSA2048, uniqueLabel("audit-rsa"))
			if err != nil {
				t.Fatal(err)
			}
			ecKey, err := tok.GenerateIssuerKey(ctx, KindP256, uniqueLabel("audit-ec"))
			if err != nil {
				t.Fatal(err)
			}
			kek, err := tok.GenerateKEK(ctx, uniqueLabel("audit-kek"), soPIN(tok))
			if err != nil {
				t.Fatal(err)
			}
			tk, err := tok.GenerateSigningKey(ctx, uniqueLabel("audit-tk"))
			if err != nil {
				t.Fatal(err)
			}
			fs, err := tok.Audit(ctx, []*IssuerKeyRef{rsaKey, ecKey}, kek, tk)
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range fs {
				t.Errorf("hardened key flagged: %s", f)
			}
			weak, weakKEK := oldStyleKeys(t, tok)
			err = tok.With(ctx, func(s Session) error {
				h, _ := weakKEK.Handle(s)
				if err := s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_DECRYPT, true)}); err != nil {
					t.Errorf("the attack on an old-style KEK failed (%v): the test shows nothing", err)
				}
				h, _ = kek.Handle(s)
				if err := s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_DECRYPT, true)}); err == nil {
					t.Errorf("the hardened KEK took CKA_DECRYPT")
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			fs, err = tok.Audit(ctx, []*IssuerKeyRef{weak}, weakKEK, nil)
			if err != nil {
				t.Fatal(err)
			}
			flagged := map[string]bool{}
			for _, f := range fs {
				flagged[f.Key+" "+f.Attribute] = true
				if f.Fix == "" {
					t.Errorf("finding without a fix: %s", f)
				}
			}
			for _, want := range []string{"issuer key " + weak.Label + " (private) CKA_MODIFIABLE", "issuer key " + weak.Label + " (private) CKA_UNWRAP_TEMPLATE",
				"KEK " + weakKEK.Label + " CKA_MODIFIABLE", "KEK " + weakKEK.Label + " CKA_DECRYPT"} {
				if !flagged[want] {
					t.Errorf("not flagged: %s (findings: %v)", want, fs)
				}
			}
		})
	}
}

// OldStyleKeys makes an RSA issuer key and a KEK with the templates of
// 2026-11-28: a few usages stated, nothing read-only, no unwrap
// templates. For tests of the weak-key refusal.
func oldStyleKeys(t *testing.T, tok *Token) (*IssuerKeyRef, *KEKRef) {
	t.Helper()
	label, kekLabel := uniqueLabel("old-rsa"), uniqueLabel("old-kek")
	if err := MakeOldStyleKeys(context.Background(), tok, label, kekLabel, soPIN(tok)); err != nil {
		t.Fatal(err)
	}
	k, err := tok.FindIssuerKey(context.Background(), label)
	if err != nil {
		t.Fatal(err)
	}
	w, err := tok.FindKEK(context.Background(), kekLabel)
	if err != nil {
		t.Fatal(err)
	}
	return k, w
}
