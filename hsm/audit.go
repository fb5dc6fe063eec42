package hsm

import (
	"context"
	"fmt"

	"github.com/miekg/pkcs11"
)

// Finding is one attribute of a live key that lets a holder of the user
// PIN out although the token could have closed it (docs/HSM.md §6).
type Finding struct {
	Key       string `json:"key"`   // "issuer key issuer-2026 (private)", "KEK kek-2026", …
	Label     string `json:"label"` // the key's CKA_LABEL
	Attribute string `json:"attribute"`
	Have      string `json:"have"`
	Want      string `json:"want"`
	Fix       string `json:"fix"`
}

func (f Finding) String() string {
	return fmt.Sprintf("%s: %s is %s, want %s (fix: %s)", f.Key, f.Attribute, f.Have, f.Want, f.Fix)
}

// Fixes, by key.
const (
	fixIssuerKey  = "make a new issuer key in a key ceremony (issuer ceremony run); new cards get it, cards already personalized keep theirs"
	fixKEK        = "make a new KEK in a key ceremony and move every stored blob to it: issuer kek rotate --from OLD --to NEW"
	fixTranscript = "make a new transcript key in the next key ceremony"
)

// policyAttrNames names the attributes the audit reads.
var policyAttrNames = map[uint]string{
	pkcs11.CKA_PRIVATE: "CKA_PRIVATE", pkcs11.CKA_SENSITIVE: "CKA_SENSITIVE", pkcs11.CKA_EXTRACTABLE: "CKA_EXTRACTABLE",
	pkcs11.CKA_MODIFIABLE: "CKA_MODIFIABLE", pkcs11.CKA_COPYABLE: "CKA_COPYABLE",
	pkcs11.CKA_ENCRYPT: "CKA_ENCRYPT", pkcs11.CKA_DECRYPT: "CKA_DECRYPT", pkcs11.CKA_WRAP: "CKA_WRAP",
	pkcs11.CKA_UNWRAP: "CKA_UNWRAP", pkcs11.CKA_SIGN: "CKA_SIGN", pkcs11.CKA_VERIFY: "CKA_VERIFY",
	pkcs11.CKA_SIGN_RECOVER: "CKA_SIGN_RECOVER", pkcs11.CKA_VERIFY_RECOVER: "CKA_VERIFY_RECOVER",
	pkcs11.CKA_DERIVE: "CKA_DERIVE", pkcs11.CKA_TRUSTED: "CKA_TRUSTED",
	pkcs11.CKA_UNWRAP_TEMPLATE: "CKA_UNWRAP_TEMPLATE", pkcs11.CKA_DERIVE_TEMPLATE: "CKA_DERIVE_TEMPLATE",
	pkcs11.CKA_WRAP_WITH_TRUSTED: "CKA_WRAP_WITH_TRUSTED", // compared only on replicable keys, whose templates state it
}

// otherAttrNames names attributes the audit does not compare.
var otherAttrNames = map[uint]string{
	pkcs11.CKA_CLASS: "CKA_CLASS", pkcs11.CKA_KEY_TYPE: "CKA_KEY_TYPE", pkcs11.CKA_TOKEN: "CKA_TOKEN",
	pkcs11.CKA_VALUE_LEN: "CKA_VALUE_LEN", pkcs11.CKA_LOCAL: "CKA_LOCAL",
	pkcs11.CKA_ALWAYS_SENSITIVE: "CKA_ALWAYS_SENSITIVE", pkcs11.CKA_NEVER_EXTRACTABLE: "CKA_NEVER_EXTRACTABLE",
	pkcs11.CKA_LABEL: "CKA_LABEL", pkcs11.CKA_ID: "CKA_ID", pkcs11.CKA_MODULUS: "CKA_MODULUS",
	pkcs11.CKA_PUBLIC_EXPONENT: "CKA_PUBLIC_EXPONENT", pkcs11.CKA_EC_PARAMS: "CKA_EC_PARAMS", pkcs11.CKA_EC_POINT: "CKA_EC_POINT",
	pkcs11.CKA_WRAP_TEMPLATE: "CKA_WRAP_TEMPLATE",
}

// AttrName is the CKA_ name of an attribute this package sets or reads.
func AttrName(t uint) string {
	if n, ok := policyAttrNames[t]; ok {
		return n
	}
	if n, ok := otherAttrNames[t]; ok {
		return n
	}
	return fmt.Sprintf("CKA_0x%X", t)
}

// Audit reads the attributes of the deployment's live keys — issuer keys
// (both halves), the KEK and the transcript key, any of which may be nil —
// and returns every one that differs from what the key policy (the
// templates this package generates keys with) would have set on this
// token. It never reads a value and changes nothing. An empty result
// means the keys are as a ceremony of this version makes them; what the
// token itself cannot close is Mechanisms.OpenPaths.
func (t *Token) Audit(ctx context.Context, keys []*IssuerKeyRef, kek *KEKRef, tk *SigningKey) ([]Finding, error) {
	var out []Finding
	err := t.With(ctx, func(s Session) error {
		out = out[:0]
		var ts templates
		defer ts.free()
		for _, k := range keys {
			if k == nil {
				continue
			}
			_, pubT, privT, err := issuerKeyTemplates(k.Kind, k.Label, k.ID, t.mech, &ts)
			if err != nil {
				return err
			}
			if k.Replicable && t.mech.EnforcesWrapWithTrusted {
				privT = replicableAttrs(privT)
			}
			priv, pub, err := k.handles(s)
			if err != nil {
				return err
			}
			out = append(out, notReplicableHere(t, auditKeyObject(s, "issuer key "+k.Label+" (private)", k.Label, fixIssuerKey, priv, privT))...)
			out = append(out, auditKeyObject(s, "issuer key "+k.Label+" (public)", k.Label, fixIssuerKey, pub, pubT)...)
		}
		if kek != nil {
			ut, err := ts.add(pkcs11.CKA_UNWRAP_TEMPLATE, KEKUnwrapTemplate)
			if err != nil {
				return err
			}
			want := append(kekAttrs(kek.Label, kek.ID, true, true, ut), attr(pkcs11.CKA_MODIFIABLE, false))
			if t.mech.EnforcesWrapWithTrusted {
				// Made by the SO and copied: copyable (unchanged copies
				// only, as the key is read-only), and trusted.
				want = append(want, attr(pkcs11.CKA_TRUSTED, true))
				if kek.Replicable {
					want = replicableAttrs(want)
				}
			} else {
				want = append(want, locked(t.mech, false)...)
			}
			h, err := kek.Handle(s)
			if err != nil {
				return err
			}
			out = append(out, notReplicableHere(t, auditKeyObject(s, "KEK "+kek.Label, kek.Label, fixKEK, h, want))...)
		}
		if tk != nil {
			_, privT := signingKeyTemplates(tk.Label, tk.ID, t.mech)
			h, err := tk.Handle(s)
			if err != nil {
				return err
			}
			out = append(out, auditKeyObject(s, "transcript key "+tk.Label, tk.Label, fixTranscript, h, privT)...)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("audit the keys on token %q: %w", t.info.Label, err)
	}
	// A replicable key leaves only under trusted keys: every trusted key
	// that could carry it out is a finding too (UnsafeTrustedWrappers).
	replicable := kek != nil && kek.Replicable
	for _, k := range keys {
		replicable = replicable || k != nil && k.Replicable
	}
	if replicable {
		fs, err := t.UnsafeTrustedWrappers(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, fs...)
	}
	return out, nil
}

// fixNotReplicableHere is the fix of an extractable key on a token that
// does not enforce CKA_WRAP_WITH_TRUSTED.
const fixNotReplicableHere = "the token does not enforce CKA_WRAP_WITH_TRUSTED, so an extractable key leaves it under any key a holder of the user PIN makes: make the key again, not replicable (replication needs a token that enforces it)"

// notReplicableHere gives a finding on CKA_EXTRACTABLE the fix for a
// token that does not enforce CKA_WRAP_WITH_TRUSTED.
func notReplicableHere(t *Token, fs []Finding) []Finding {
	if t.mech.EnforcesWrapWithTrusted {
		return fs
	}
	for i := range fs {
		if fs[i].Attribute == "CKA_EXTRACTABLE" {
			fs[i].Fix = fixNotReplicableHere
		}
	}
	return fs
}

// auditObject compares h's attributes with the policy template it would
// have been generated with: every CK_BBOOL attribute the audit knows
// (policyAttrNames), and the presence of every attribute of an array template.
func auditKeyObject(s Session, what, label, fix string, h pkcs11.ObjectHandle, want []*pkcs11.Attribute) []Finding {
	var out []Finding
	for _, w := range want {
		name, known := policyAttrNames[w.Type]
		if !known {
			continue
		}
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(w.Type, nil)})
		if w.Type&pkcs11.CKF_ARRAY_ATTRIBUTE != 0 {
			// The template's length says how many attributes it holds
			// (each a CK_ATTRIBUTE); their values cannot be read without
			// buffers miekg/pkcs11 does not lay out.
			n := 0
			if err == nil {
				n = len(a[0].Value) / ckAttributeSize
			}
			if wantN := len(w.Value) / ckAttributeSize; n < wantN {
				out = append(out, Finding{Key: what, Label: label, Attribute: name, Have: fmt.Sprintf("%d attributes", n),
					Want: fmt.Sprintf("the %d of the key policy (docs/HSM.md §6)", wantN), Fix: fix})
			}
			continue
		}
		wantV := len(w.Value) == 1 && w.Value[0] != 0
		if err != nil || len(a[0].Value) != 1 {
			if IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) && w.Type == pkcs11.CKA_COPYABLE {
				continue
			}
			out = append(out, Finding{Key: what, Label: label, Attribute: name, Have: "unreadable (" + Explain(err) + ")", Want: fmt.Sprint(wantV), Fix: fix})
			continue
		}
		if have := a[0].Value[0] != 0; have != wantV {
			out = append(out, Finding{Key: what, Label: label, Attribute: name, Have: fmt.Sprint(have), Want: fmt.Sprint(wantV), Fix: fix})
		}
	}
	return out
}
