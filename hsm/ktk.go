package hsm

import (
	"context"
	"errors"
	"fmt"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// Handing K_I to the systems that use it (docs/EXPORT.md). The receiver's
// HSM makes an AES key-transport key (KTK) and sends it encrypted to the
// issuer's key-import key, an RSA key pair whose private half can do one
// thing: C_UnwrapKey into a KTK as KTKUnwrapTemplate has it. The KTK can
// do one thing too: C_WrapKey. Each exported K_I is unwrapped from its
// blob under the KEK and wrapped under the KTK in one session, and the
// unwrapped copy destroyed: K_I is in the clear on no host.

// KTKUnwrapTemplate is the key-import key's CKA_UNWRAP_TEMPLATE: what it
// unwraps is a sensitive key, extractable if at all only under a
// CKA_TRUSTED key, that can wrap and nothing else — not unwrap (so an export cannot be brought back into the token
// under attributes of a PIN holder's choosing), not encrypt or decrypt
// (C_Encrypt would let its holder make exports of keys of their own,
// C_Decrypt would open an export), not sign, verify or derive.
var KTKUnwrapTemplate = map[uint]bool{
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_WRAP_WITH_TRUSTED: true, pkcs11.CKA_WRAP: true,
	pkcs11.CKA_UNWRAP: false, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false,
	pkcs11.CKA_SIGN: false, pkcs11.CKA_VERIFY: false, pkcs11.CKA_DERIVE: false,
}

// KTKWrapTemplate is a trusted KTK's CKA_WRAP_TEMPLATE (set where the
// SO makes the KTK trusted): it wraps only a key that can neither wrap,
// unwrap nor derive — K_I as ExportCardKey unwraps it — never a KEK, a
// private key (which has no CKA_WRAP) or a chain's S. Without it a
// holder of the user PIN could wrap a replicable issuer key or KEK
// (replicate.go), extractable under trusted keys, under the KTK for its
// receiver to open.
var KTKWrapTemplate = map[uint]bool{pkcs11.CKA_WRAP: false, pkcs11.CKA_UNWRAP: false, pkcs11.CKA_DERIVE: false}

// KeyImportKind is the key-import key's type: RSA-3072, for its
// 128-bit strength (the KTK is AES-256).
const KeyImportKind = KindRSA3072

// KTKLen is the KTK's length: AES-256.
const KTKLen = 32

// KeyImportOAEP is the encryption the sender puts the KTK under: RSA-OAEP
// with SHA-1 and MGF1-SHA1 and an empty label, the one OAEP every token
// of the tables unwraps with (SoftHSM2 2.6 refuses other hashes in
// C_UnwrapKey).
func KeyImportOAEP() *pkcs11.Mechanism {
	return pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
		pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
}

// KeyImportRef is the key-import key pair in a token.
type KeyImportRef struct {
	Label  string
	ID     []byte
	Public *protocol.IssuerKey // the public key in canonical SPKI form (PEM, fingerprint)

	tok  *Token
	priv handleCache
}

// Handle returns the private key's handle for use in s.
func (k *KeyImportRef) Handle(s Session) (pkcs11.ObjectHandle, error) { return k.priv.get(k.tok, s) }

// GenerateKeyImportKey generates the key-import key pair as token objects
// labelled label: the private key unwraps (KTKUnwrapTemplate) and does
// nothing else, the public object has every usage false (the sender
// encrypts to the exported public key, not in this token).
func (t *Token) GenerateKeyImportKey(ctx context.Context, label string) (*KeyImportRef, error) {
	if label == "" {
		return nil, errors.New("generate key-import key: empty label")
	}
	id := newID()
	var ts templates
	defer ts.free()
	mech, pubT, privT, err := issuerKeyTemplates(KeyImportKind, label, id, t.mech, &ts)
	if err != nil {
		return nil, fmt.Errorf("generate key-import key %q: %w", label, err)
	}
	// The issuer key's template, with the KTK's unwrap template in place
	// of the one for S.
	ut, err := ts.add(pkcs11.CKA_UNWRAP_TEMPLATE, KTKUnwrapTemplate)
	if err != nil {
		return nil, err
	}
	for i, a := range privT {
		if a.Type == pkcs11.CKA_UNWRAP_TEMPLATE {
			privT[i] = ut
		}
	}
	ref := &KeyImportRef{Label: label, ID: id, tok: t}
	ref.priv.find = privateKeyFind(label, id)
	err = t.With(ctx, func(s Session) error {
		pubH, privH, err := generatePair(s, mech, label, id, pubT, privT)
		if err != nil {
			return err
		}
		if ref.Public, err = exportPublic(s, pubH); err != nil {
			s.P.DestroyObject(s.H, privH)
			s.P.DestroyObject(s.H, pubH)
			return err
		}
		ref.priv.set(t, privH)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("generate key-import key %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

// FindKeyImportKey finds the key-import key pair labelled label.
func (t *Token) FindKeyImportKey(ctx context.Context, label string) (*KeyImportRef, error) {
	ik, err := t.FindIssuerKey(ctx, label)
	if err != nil {
		return nil, fmt.Errorf("find key-import key: %w", err)
	}
	ref := &KeyImportRef{Label: label, ID: ik.ID, Public: ik.Public, tok: t}
	ref.priv.find = privateKeyFind(label, ik.ID)
	return ref, nil
}

// KTKRef is a key-transport key in the token.
type KTKRef struct {
	Label string
	ID    []byte
	// Trusted is CKA_TRUSTED: the security officer marked it. On a token
	// that enforces CKA_WRAP_WITH_TRUSTED only a trusted KTK can receive
	// K_I.
	Trusted bool
	// CheckValue is the token's CKA_CHECK_VALUE of the KTK (PKCS#11 3.0:
	// the first 3 bytes of AES-ECB of a zero block), nil where the token
	// does not give it (checkValue).
	CheckValue []byte

	tok *Token
	obj handleCache
}

// Handle returns the KTK's handle for use in s.
func (k *KTKRef) Handle(s Session) (pkcs11.ObjectHandle, error) { return k.obj.get(k.tok, s) }

// ktkAttrs is a KTK's template: KTKUnwrapTemplate's attributes with
// their values, extractable only for the moment of the trusted import.
func ktkAttrs(label string, id []byte, token, private, extractable bool) []*pkcs11.Attribute {
	return append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_TOKEN, token), attr(pkcs11.CKA_PRIVATE, private),
		attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, extractable), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
	}, usages(secretUsages, pkcs11.CKA_WRAP)...)
}

// ImportKTK unwraps wrapped (the receiver's KTK, RSA-OAEP to the
// key-import key ik: KeyImportOAEP) into a private token object labelled
// label that can only wrap, and reads its check value.
//
// On a token that enforces CKA_WRAP_WITH_TRUSTED (SoftHSM2) the KTK must
// be CKA_TRUSTED, and soPIN is required: the security officer makes the
// token's copy, trusted (trustedKTK says how), in one session. A holder of the
// user PIN alone can unwrap a KTK of their own but not mark it trusted,
// so no K_I can be wrapped under it there. Elsewhere soPIN is not used.
func (t *Token) ImportKTK(ctx context.Context, ik *KeyImportRef, label string, wrapped []byte, soPIN string) (*KTKRef, error) {
	if label == "" {
		return nil, errors.New("import KTK: empty label")
	}
	ref := &KTKRef{Label: label, ID: newID(), tok: t}
	ref.obj.find = kekFind(label, ref.ID)
	var err error
	if t.mech.EnforcesWrapWithTrusted {
		if soPIN == "" {
			return nil, fmt.Errorf("import KTK %q: token %q enforces CKA_WRAP_WITH_TRUSTED, so the security officer must mark the KTK trusted: give the SO PIN", label, t.info.Label)
		}
		ref.Trusted = true
		err = t.exclusive(ctx, func(ps *pooled) error { return t.trustedKTK(ps, ik, ref, wrapped, soPIN) })
	} else {
		err = t.With(ctx, func(s Session) error {
			if err := labelFree(s, label); err != nil {
				return err
			}
			h, err := unwrapKTK(s, ik, wrapped, append(ktkAttrs(label, ref.ID, true, true, false), locked(t.mech, false)...))
			if err != nil {
				return err
			}
			ref.obj.set(t, h)
			ref.CheckValue, err = checkValue(s, h)
			return err
		})
	}
	if err != nil {
		return nil, fmt.Errorf("import KTK %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

func unwrapKTK(s Session, ik *KeyImportRef, wrapped []byte, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
	priv, err := ik.priv.get(ik.tok, s)
	if err != nil {
		return 0, err
	}
	m := KeyImportOAEP()
	h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, priv, wrapped, tmpl)
	if err != nil {
		return 0, fmt.Errorf("unwrap the KTK under the key-import key %q (RSA-OAEP SHA-1): %w", ik.Label, Call("C_UnwrapKey", m, err))
	}
	if n, err := valueLen(s, h); err == nil && n != 0 && n != KTKLen {
		s.P.DestroyObject(s.H, h)
		return 0, fmt.Errorf("the KTK is %d bytes, want %d (AES-256)", n, KTKLen)
	}
	return h, nil
}

func (t *Token) trustedKTK(ps *pooled, ik *KeyImportRef, ref *KTKRef, wrapped []byte, soPIN string) error {
	s := t.session(ps)
	if err := labelFree(s, ref.Label); err != nil {
		return err
	}
	// SoftHSM2 lets the SO set CKA_TRUSTED only on an object it makes
	// (generated or unwrapped; not by C_SetAttributeValue, not in a
	// copy: CKR_ATTRIBUTE_READ_ONLY), and the SO cannot use the user's
	// private key-import key. So the KTK crosses from the user to the SO
	// under a transfer key the SO makes, trusted, for this session only:
	// the user unwraps the KTK (extractable only under a trusted key),
	// wraps it under the transfer key, the SO unwraps that as a trusted
	// key, the user copies it into a private, read-only token object.
	// Every session object is destroyed at the end; the host sees the KTK
	// only under the transfer key.
	var transfer, trusted pkcs11.ObjectHandle
	defer func() {
		for _, h := range []pkcs11.ObjectHandle{trusted, transfer} {
			if h != 0 {
				s.P.DestroyObject(s.H, h)
			}
		}
	}()
	wm := pkcs11.NewMechanism(s.M.AESKeyWrap(), nil)
	wt, err := newCKATemplate(pkcs11.CKA_WRAP_TEMPLATE, KTKWrapTemplate)
	if err != nil {
		return err
	}
	defer wt.free()
	err = t.asSO(ps, soPIN, func(s Session) (err error) {
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
		transfer, err = s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, append([]*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
			attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false),
			attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_TRUSTED, true),
		}, usages(secretUsages, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP)...))
		return Call("C_GenerateKey", m, err)
	})
	if err != nil {
		return fmt.Errorf("the security officer makes the transfer key: %w", err)
	}
	tmp, err := unwrapKTK(s, ik, wrapped, ktkAttrs(ref.Label, ref.ID, false, true, true))
	if err != nil {
		return err
	}
	crossing, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{wm}, transfer, tmp)
	if derr := s.P.DestroyObject(s.H, tmp); err == nil && derr != nil {
		err = derr
	}
	if err != nil {
		return fmt.Errorf("wrap the KTK under the transfer key: %w", Call("C_WrapKey", wm, err))
	}
	err = t.asSO(ps, soPIN, func(s Session) (err error) {
		trusted, err = s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{wm}, transfer, crossing,
			append(ktkAttrs(ref.Label, ref.ID, false, false, false), attr(pkcs11.CKA_TRUSTED, true), wt.attr))
		return Call("C_UnwrapKey", wm, err)
	})
	if err != nil {
		return fmt.Errorf("the security officer unwraps the KTK trusted: %w", err)
	}
	h, err := s.P.CopyObject(s.H, trusted, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_MODIFIABLE, false)})
	if err != nil {
		return fmt.Errorf("copy the trusted KTK into a private token object: %w", Call("C_CopyObject", nil, err))
	}
	ref.obj.set(t, h)
	ref.CheckValue, err = checkValue(s, h)
	return err
}

// ErrNoKTK and ErrNotKTK are FindKTK's refusals: no secret key with the
// label, or one that is not a KTK (a KEK can unwrap; a KTK only wraps).
var (
	ErrNoKTK  = errors.New("no KTK with this label")
	ErrNotKTK = errors.New("not a KTK (a KTK can wrap and not unwrap; a KEK can both)")
)

// FindKTK finds the KTK labelled label.
func (t *Token) FindKTK(ctx context.Context, label string) (*KTKRef, error) {
	ref := &KTKRef{Label: label, tok: t}
	err := t.With(ctx, func(s Session) error {
		hs, err := findObjects(s, kekFind(label, nil), 2)
		switch {
		case err != nil:
			return err
		case len(hs) == 0:
			return ErrNoKTK
		case len(hs) > 1:
			return fmt.Errorf("several secret keys labelled %q; labels must be unique", label)
		}
		h := hs[0]
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_ID, nil), attr(pkcs11.CKA_WRAP, nil), attr(pkcs11.CKA_UNWRAP, nil)})
		if err != nil {
			return Call("C_GetAttributeValue", nil, err)
		}
		if len(a[1].Value) != 1 || a[1].Value[0] != 1 || len(a[2].Value) != 1 || a[2].Value[0] != 0 {
			return fmt.Errorf("%q is %w", label, ErrNotKTK)
		}
		ref.ID = a[0].Value
		if a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_TRUSTED, nil)}); err == nil && len(a[0].Value) == 1 {
			ref.Trusted = a[0].Value[0] == 1
		}
		ref.obj.find = kekFind(label, ref.ID)
		ref.obj.set(t, h)
		ref.CheckValue, err = checkValue(s, h)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("find KTK %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

// checkValue reads h's CKA_CHECK_VALUE, or nil where the token does not
// know the attribute (NSS softokn) or leaves it empty (SoftHSM2 2.6.1
// computes it for keys it generates or creates, not for keys it
// unwraps).
func checkValue(s Session, h pkcs11.ObjectHandle) ([]byte, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_CHECK_VALUE, nil)})
	switch {
	case IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID):
		return nil, nil
	case err != nil:
		return nil, Call("C_GetAttributeValue", nil, err)
	case len(a[0].Value) == 0:
		return nil, nil
	}
	return a[0].Value, nil
}

// Export is one card's K_I for a receiver: wrapped under the KTK with
// RFC 3394 AES key wrap (24 bytes for a 16-byte K_I: deterministic, so
// the same K_I under the same KTK always gives the same bytes), and K_I's
// check value as the token computes it (nil where it does not).
type Export struct {
	Wrapped    []byte
	CheckValue []byte
}

// ExportCardKey unwraps blob under kek into a session key that can do
// nothing (rewrapTemplate: sensitive, every usage false, extractable only
// under a CKA_TRUSTED key), reads its CKA_CHECK_VALUE, wraps it under ktk
// with the token's RFC 3394 mechanism, and destroys it whatever
// happened. On a token that enforces CKA_WRAP_WITH_TRUSTED an untrusted
// ktk is refused by the token (CKR_KEY_NOT_WRAPPABLE).
func ExportCardKey(s Session, kek, ktk pkcs11.ObjectHandle, blob Blob) (Export, error) {
	if blob.Scheme != WrapRFC5649 || len(blob.Wrapped) != wrappedKILen {
		return Export{}, fmt.Errorf("export K_I: blob %q of %d bytes, want %q of %d", blob.Scheme, len(blob.Wrapped), WrapRFC5649, wrappedKILen)
	}
	mech, err := rfc5649(s)
	if err != nil {
		return Export{}, fmt.Errorf("export K_I: %w", err)
	}
	m := pkcs11.NewMechanism(mech, nil)
	ki, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kek, blob.Wrapped, rewrapTemplate(s.M))
	if err != nil {
		err = Call("C_UnwrapKey", m, err)
		if IsRV(err, pkcs11.CKR_TEMPLATE_INCONSISTENT) {
			return Export{}, fmt.Errorf("export K_I: unwrap under the KEK: %w (%w)", ErrKEKNotRewrappable, err)
		}
		return Export{}, fmt.Errorf("export K_I: unwrap under the KEK (%s): %w", WrapRFC5649, err)
	}
	var out Export
	out.CheckValue, err = checkValue(s, ki)
	if err == nil {
		wm := pkcs11.NewMechanism(s.M.AESKeyWrap(), nil)
		out.Wrapped, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{wm}, ktk, ki)
		if err != nil {
			err = fmt.Errorf("wrap K_I under the KTK (RFC 3394): %w", Call("C_WrapKey", wm, err))
		} else if len(out.Wrapped) != protocol.KeySize+8 {
			err = fmt.Errorf("wrap K_I under the KTK: the token returned %d bytes, want %d", len(out.Wrapped), protocol.KeySize+8)
		}
	}
	if derr := s.P.DestroyObject(s.H, ki); derr != nil {
		err = errors.Join(err, fmt.Errorf("destroy the unwrapped K_I: %w", Call("C_DestroyObject", nil, derr)))
	}
	if err != nil {
		return Export{}, fmt.Errorf("export K_I: %w", err)
	}
	return out, nil
}
