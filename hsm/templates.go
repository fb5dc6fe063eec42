package hsm

import (
	"github.com/miekg/pkcs11"
)

// The key policy of docs/HSM.md §6, in one place. Every object this
// package creates states every attribute that decides what a holder of
// the user PIN can do with it, because tokens default what a template
// leaves out (SoftHSM2 2.6.1 made an EC public key with CKA_ENCRYPT,
// CKA_WRAP and CKA_VERIFY_RECOVER true): its usages, all of them, with
// only the ones the chain needs true; CKA_MODIFIABLE false, so no usage
// can be switched on later; CKA_COPYABLE false where the token knows it,
// so no copy can switch one on either; and on the two keys that make
// secret-key objects (the issuer key, by C_UnwrapKey, and the KEK) a
// CKA_UNWRAP_TEMPLATE that every such object must match.

// Usage attributes, by object class: the ones PKCS#11 defines for it.
var (
	privateUsages = []uint{pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE}
	publicUsages  = []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_VERIFY, pkcs11.CKA_VERIFY_RECOVER, pkcs11.CKA_WRAP, pkcs11.CKA_DERIVE}
	secretUsages  = []uint{pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY,
		pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE}
)

// usages states every usage attribute of a class: the ones in on true,
// the others false.
func usages(class []uint, on ...uint) []*pkcs11.Attribute {
	out := make([]*pkcs11.Attribute, 0, len(class))
	for _, u := range class {
		v := false
		for _, o := range on {
			v = v || o == u
		}
		out = append(out, attr(u, v))
	}
	return out
}

// locked makes an object read-only: CKA_MODIFIABLE false, and
// CKA_COPYABLE false where the token knows the attribute. A key the SO
// makes for the user to copy (the trusted KEK) keeps CKA_COPYABLE, which
// can only be made false, never true again; SoftHSM2 refuses every copy
// of a non-modifiable object that changes an attribute
// (CKR_ATTRIBUTE_READ_ONLY), which `issuer probe` checks.
func locked(m *Mechanisms, copyable bool) []*pkcs11.Attribute {
	a := []*pkcs11.Attribute{attr(pkcs11.CKA_MODIFIABLE, false)}
	if m != nil && m.KnowsCopyable && !copyable {
		a = append(a, attr(pkcs11.CKA_COPYABLE, false))
	}
	return a
}

// sessionLocked is locked for the session objects the chains make (S, Z,
// K_I, a K_I unwrapped to verify a MAC): SoftHSM2 refuses CKA_COPYABLE in
// C_UnwrapKey and C_DeriveKey templates (CKR_ATTRIBUTE_READ_ONLY). These
// objects live for one call in the issuer's own session, which no other
// process can see.
var sessionLocked = []*pkcs11.Attribute{attr(pkcs11.CKA_MODIFIABLE, false)}

// SecretUnwrapTemplate is the CKA_UNWRAP_TEMPLATE of the RSA issuer key:
// the only secret-key object C_UnwrapKey can make from a card's c is S
// as the chain needs it — sensitive, usable to derive K_I and for nothing
// else, and if extractable then only under a CKA_TRUSTED key. Without it
// a PIN holder unwraps c into an extractable key, or one with
// CKA_ENCRYPT (then C_Encrypt of the aes KDF's block is K_I), and reads S
// or K_I (docs/HSM.md §6.1).
var SecretUnwrapTemplate = map[uint]bool{
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_WRAP_WITH_TRUSTED: true, pkcs11.CKA_DERIVE: true,
	pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false, pkcs11.CKA_VERIFY: false,
	pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false,
}

// DeriveTemplate is the CKA_DERIVE_TEMPLATE of the EC issuer key, on a
// token that accepts it (Mechanisms.KnowsDeriveTemplate): what ECDH makes
// is Z (which derives K_I) or K_I itself (x963, which does not), so
// CKA_DERIVE is left free; the rest is SecretUnwrapTemplate's.
var DeriveTemplate = map[uint]bool{
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_WRAP_WITH_TRUSTED: true,
	pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false, pkcs11.CKA_VERIFY: false,
	pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false,
}

// KEKUnwrapTemplate is the KEK's CKA_UNWRAP_TEMPLATE: every key unwrapped
// under the KEK is sensitive, can leave the token again only under a
// CKA_TRUSTED key (the next KEK, in a rotation), and can verify a MAC but
// not derive, encrypt, decrypt, sign, wrap or unwrap. CKA_EXTRACTABLE is
// left to the caller: verification unwraps K_I non-extractable, KEK
// rotation extractable, to wrap it under the new KEK. A token enforces
// the template by refusing (CKR_TEMPLATE_INCONSISTENT) an unwrap whose
// template does not state each attribute with this value; it does not
// merge them in (SoftHSM2).
var KEKUnwrapTemplate = map[uint]bool{
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_WRAP_WITH_TRUSTED: true,
	pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false,
	pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DERIVE: false,
}

// ckaTemplate is an array attribute (CKA_UNWRAP_TEMPLATE,
// CKA_DERIVE_TEMPLATE) laid out in C memory; free it after the call that
// uses it.
type ckaTemplate struct {
	attr *pkcs11.Attribute
	free func()
}

func newCKATemplate(typ uint, policy map[uint]bool) (ckaTemplate, error) {
	b, free, err := boolTemplate(policy)
	if err != nil {
		return ckaTemplate{}, err
	}
	return ckaTemplate{attr: attr(typ, b), free: free}, nil
}

// templates collects the array attributes of one generation call.
type templates []ckaTemplate

func (ts *templates) add(typ uint, policy map[uint]bool) (*pkcs11.Attribute, error) {
	t, err := newCKATemplate(typ, policy)
	if err != nil {
		return nil, err
	}
	*ts = append(*ts, t)
	return t.attr, nil
}

func (ts templates) free() {
	for _, t := range ts {
		t.free()
	}
}
