package hsm

/*
#include <stdlib.h>

// CK_ATTRIBUTE, natural alignment (PKCS#11 packs structures only on
// Windows); CK_ULONG is unsigned long.
typedef struct {
	unsigned long type;
	void *pValue;
	unsigned long ulValueLen;
} bp_keys_attribute;

// bp_keys_bool_template lays out n CK_BBOOL attributes in one C block:
// the CK_ATTRIBUTE array, then the n value bytes it points to.
static void *bp_keys_bool_template(const unsigned long *types, const unsigned char *values, int n) {
	bp_keys_attribute *a = malloc(n * sizeof(bp_keys_attribute) + n);
	if (a == NULL) {
		return NULL;
	}
	unsigned char *v = (unsigned char *)(a + n);
	for (int i = 0; i < n; i++) {
		v[i] = values[i];
		a[i].type = types[i];
		a[i].pValue = &v[i];
		a[i].ulValueLen = 1;
	}
	return a;
}
*/
import "C"

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"sync"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// Issuer key kinds, as `issuer keygen --kind` spells them.
const (
	KindRSA2048 = "rsa2048"
	KindRSA3072 = "rsa3072"
	KindP256    = "p256"
)

// ecParamsP256 is CKA_EC_PARAMS for P-256: the DER OID prime256v1.
var ecParamsP256 = []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}

// handleCache remembers the handle of a token object for the module
// generation it was found in; after a re-initialization it finds the
// object again by its template.
type handleCache struct {
	mu    sync.Mutex
	h     pkcs11.ObjectHandle
	stamp [2]uint64 // module generation, token epoch
	find  []*pkcs11.Attribute
}

func (t *Token) handleStamp() [2]uint64 { return [2]uint64{t.mod.gen.Load(), t.epoch.Load()} }

func (c *handleCache) get(tok *Token, s Session) (pkcs11.ObjectHandle, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	stamp := tok.handleStamp()
	if c.h != 0 && c.stamp == stamp {
		return c.h, nil
	}
	hs, err := findObjects(s, c.find, 2)
	if err != nil {
		return 0, err
	}
	if len(hs) != 1 {
		return 0, fmt.Errorf("find key object again: %d matches, want 1", len(hs))
	}
	c.h, c.stamp = hs[0], stamp
	return c.h, nil
}

func (c *handleCache) set(tok *Token, h pkcs11.ObjectHandle) {
	c.mu.Lock()
	c.h, c.stamp = h, tok.handleStamp()
	c.mu.Unlock()
}

// IssuerKeyRef is the issuer's key pair in a token: the private key (a
// token object the chains use by handle) and its public key, exported.
type IssuerKeyRef struct {
	Label string
	ID    []byte // CKA_ID, shared by the private and public objects
	Kind  string // KindRSA2048, KindRSA3072 or KindP256
	// Public is the public key in canonical form: PEM, fingerprint,
	// binding data B all come from it.
	Public *protocol.IssuerKey
	// Replicable is CKA_EXTRACTABLE of the private key: a key made to be
	// copied to the other members of a group, under trusted keys only
	// (replicate.go).
	Replicable bool

	tok  *Token
	priv handleCache
}

// Handle returns the private key's handle for use in s (a session of the
// same Token). Handles are valid in every session of the process; after
// the library is re-initialized the key is found again.
func (k *IssuerKeyRef) Handle(s Session) (pkcs11.ObjectHandle, error) {
	return k.priv.get(k.tok, s)
}

// handles returns the handles of the private key and of its public key
// object (the one with the private key's CKA_ID) in s.
func (k *IssuerKeyRef) handles(s Session) (priv, pub pkcs11.ObjectHandle, err error) {
	if priv, err = k.Handle(s); err != nil {
		return 0, 0, err
	}
	pub, err = findOne(s, publicKeyFind(k.ID), "public key with the private key's CKA_ID")
	return priv, pub, err
}

// PublicKeyPEM is the public key as a PEM "PUBLIC KEY" block.
func (k *IssuerKeyRef) PublicKeyPEM() []byte { return k.Public.PEM() }

// Fingerprint is SHA-256 of the DER SubjectPublicKeyInfo.
func (k *IssuerKeyRef) Fingerprint() [32]byte { return k.Public.Fingerprint() }

// KEKRef is the key-encryption key in a token.
type KEKRef struct {
	Label string
	ID    []byte
	// Trusted is CKA_TRUSTED: the security officer marked it, and keys
	// with CKA_WRAP_WITH_TRUSTED can leave the token only under it.
	Trusted bool
	// Replicable is CKA_EXTRACTABLE (see IssuerKeyRef.Replicable).
	Replicable bool

	tok *Token
	obj handleCache
}

// Handle returns the KEK's handle for use in s (see IssuerKeyRef.Handle).
func (k *KEKRef) Handle(s Session) (pkcs11.ObjectHandle, error) {
	return k.obj.get(k.tok, s)
}

func attr(typ uint, v any) *pkcs11.Attribute { return pkcs11.NewAttribute(typ, v) }

// issuerKeyTemplates returns the public and private templates of a new
// issuer key pair (docs/HSM.md §6). The private key does exactly one
// thing: C_UnwrapKey (RSA: the card's c becomes S, a secret-key object
// that must match SecretUnwrapTemplate) or C_DeriveKey (EC: ECDH). It
// never decrypts — C_Decrypt would put S on the host — and never signs.
// The public object only holds the public attributes we export: every
// usage is false. Both are read-only. ts receives the C memory of the
// array attributes; the caller frees it after the call.
func issuerKeyTemplates(kind, label string, id []byte, m *Mechanisms, ts *templates) (mech uint, pub, priv []*pkcs11.Attribute, err error) {
	common := func(class uint) []*pkcs11.Attribute {
		return append([]*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, class), attr(pkcs11.CKA_TOKEN, true),
			attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id),
		}, locked(m, false)...)
	}
	pub = append(append(common(pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_PRIVATE, false)), usages(publicUsages)...)
	priv = append(common(pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_PRIVATE, true),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false))
	switch kind {
	case KindRSA2048, KindRSA3072:
		bits := 2048
		if kind == KindRSA3072 {
			bits = 3072
		}
		ut, err := ts.add(pkcs11.CKA_UNWRAP_TEMPLATE, SecretUnwrapTemplate)
		if err != nil {
			return 0, nil, nil, err
		}
		pub = append(pub, attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
			attr(pkcs11.CKA_MODULUS_BITS, bits),
			attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(m.RSAExponent)).Bytes()))
		priv = append(append(priv, attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA), ut), usages(privateUsages, pkcs11.CKA_UNWRAP)...)
		return pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pub, priv, nil
	case KindP256:
		pub = append(pub, attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC), attr(pkcs11.CKA_EC_PARAMS, ecParamsP256))
		priv = append(append(priv, attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC)), usages(privateUsages, pkcs11.CKA_DERIVE)...)
		if m.KnowsDeriveTemplate {
			dt, err := ts.add(pkcs11.CKA_DERIVE_TEMPLATE, DeriveTemplate)
			if err != nil {
				return 0, nil, nil, err
			}
			priv = append(priv, dt)
		}
		return pkcs11.CKM_EC_KEY_PAIR_GEN, pub, priv, nil
	}
	return 0, nil, nil, fmt.Errorf("unknown key kind %q (want %s, %s or %s)", kind, KindRSA2048, KindRSA3072, KindP256)
}

// GenerateIssuerKey generates the issuer key pair in the token as token
// objects labelled label, with a fresh random CKA_ID, and exports its
// public key. RSA keys get the exponent of the token's table (3 where the
// token generates it, as the paper has it; else 65537). A label already
// in use is refused.
func (t *Token) GenerateIssuerKey(ctx context.Context, kind, label string) (*IssuerKeyRef, error) {
	return t.generateIssuerKey(ctx, kind, label, false)
}

func (t *Token) generateIssuerKey(ctx context.Context, kind, label string, replicable bool) (*IssuerKeyRef, error) {
	if label == "" {
		return nil, errors.New("generate issuer key: empty label")
	}
	id := newID()
	var ts templates
	defer ts.free()
	mech, pubT, privT, err := issuerKeyTemplates(kind, label, id, t.mech, &ts)
	if err != nil {
		return nil, fmt.Errorf("generate issuer key %q: %w", label, err)
	}
	if replicable {
		privT = replicableAttrs(privT)
	}
	ref := &IssuerKeyRef{Label: label, ID: id, Kind: kind, Replicable: replicable, tok: t}
	ref.priv.find = privateKeyFind(label, id)
	err = t.With(ctx, func(s Session) error {
		pubH, privH, err := generatePair(s, mech, label, id, pubT, privT)
		if err != nil {
			return err
		}
		pk, err := exportPublic(s, pubH)
		if err != nil {
			// A key whose public part cannot be exported is useless:
			// remove it rather than leave it for a later FindIssuerKey.
			s.P.DestroyObject(s.H, privH)
			s.P.DestroyObject(s.H, pubH)
			return err
		}
		ref.Public = pk
		ref.priv.set(t, privH)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("generate issuer key %q (%s) on token %q: %w", label, kind, t.info.Label, err)
	}
	return ref, nil
}

// generatePair makes a key pair labelled label with CKA_ID id, unless a
// first attempt of With's retry already made it (same random ID): then it
// returns that pair. A label already in use by anything else is refused.
func generatePair(s Session, mech uint, label string, id []byte, pubT, privT []*pkcs11.Attribute) (pub, priv pkcs11.ObjectHandle, err error) {
	privs, err := findObjects(s, privateKeyFind(label, id), 2)
	if err != nil {
		return 0, 0, err
	}
	if len(privs) == 1 {
		pub, err = findOne(s, publicKeyFind(id), "public key")
		return pub, privs[0], err
	}
	if err := labelFree(s, label); err != nil {
		return 0, 0, err
	}
	m := pkcs11.NewMechanism(mech, nil)
	pub, priv, err = s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m}, pubT, privT)
	if err != nil {
		return 0, 0, Call("C_GenerateKeyPair", m, err)
	}
	return pub, priv, nil
}

// FindIssuerKey finds the issuer key pair labelled label (the private key
// by label, the public key by the private key's CKA_ID) and exports its
// public key.
func (t *Token) FindIssuerKey(ctx context.Context, label string) (*IssuerKeyRef, error) {
	ref := &IssuerKeyRef{Label: label, tok: t}
	err := t.With(ctx, func(s Session) error {
		find := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_LABEL, label)}
		privH, err := findOne(s, find, "private key")
		if err != nil {
			return err
		}
		a, err := s.P.GetAttributeValue(s.H, privH, []*pkcs11.Attribute{attr(pkcs11.CKA_ID, nil)})
		if err != nil {
			return Call("C_GetAttributeValue", nil, err)
		}
		ref.ID = a[0].Value
		pubH, err := findOne(s, publicKeyFind(ref.ID), "public key with the private key's CKA_ID")
		if err != nil {
			return err
		}
		if ref.Public, err = exportPublic(s, pubH); err != nil {
			return err
		}
		ref.Kind = kindOf(ref.Public)
		ref.Replicable = flagAttr(s, privH, pkcs11.CKA_EXTRACTABLE)
		ref.priv.find = privateKeyFind(label, ref.ID)
		ref.priv.set(t, privH)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find issuer key %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

func kindOf(k *protocol.IssuerKey) string {
	switch {
	case k.EC != nil:
		return KindP256
	case k.RSA.N.BitLen() == 2048:
		return KindRSA2048
	case k.RSA.N.BitLen() == 3072:
		return KindRSA3072
	}
	return fmt.Sprintf("rsa%d", k.RSA.N.BitLen())
}

func privateKeyFind(label string, id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id)}
}

func publicKeyFind(id []byte) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_ID, id)}
}

// exportPublic reads the public attributes of a public key object (never
// the value attribute of anything) and returns the key in canonical SPKI form.
func exportPublic(s Session, pub pkcs11.ObjectHandle) (*protocol.IssuerKey, error) {
	a, err := s.P.GetAttributeValue(s.H, pub, []*pkcs11.Attribute{attr(pkcs11.CKA_KEY_TYPE, nil)})
	if err != nil {
		return nil, Call("C_GetAttributeValue", nil, err)
	}
	kt, err := ckULong(a[0].Value)
	if err != nil {
		return nil, err
	}
	var pk any
	switch kt {
	case pkcs11.CKK_RSA:
		a, err := s.P.GetAttributeValue(s.H, pub, []*pkcs11.Attribute{attr(pkcs11.CKA_MODULUS, nil), attr(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
		if err != nil {
			return nil, Call("C_GetAttributeValue", nil, err)
		}
		e := new(big.Int).SetBytes(a[1].Value)
		if !e.IsInt64() || e.Int64() > 1<<31-1 {
			return nil, fmt.Errorf("RSA public exponent %v out of range", e)
		}
		pk = &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: int(e.Int64())}
	case pkcs11.CKK_EC:
		a, err := s.P.GetAttributeValue(s.H, pub, []*pkcs11.Attribute{attr(pkcs11.CKA_EC_PARAMS, nil), attr(pkcs11.CKA_EC_POINT, nil)})
		if err != nil {
			return nil, Call("C_GetAttributeValue", nil, err)
		}
		if string(a[0].Value) != string(ecParamsP256) {
			return nil, fmt.Errorf("EC key with CKA_EC_PARAMS %x, want P-256", a[0].Value)
		}
		point, err := ecPoint(a[1].Value)
		if err != nil {
			return nil, err
		}
		if pk, err = ecdh.P256().NewPublicKey(point); err != nil {
			return nil, fmt.Errorf("CKA_EC_POINT: %w", err)
		}
	default:
		return nil, fmt.Errorf("public key of type 0x%X, want RSA or EC", kt)
	}
	spki, err := x509.MarshalPKIXPublicKey(pk)
	if err != nil {
		return nil, err
	}
	return protocol.ParseIssuerKey(spki)
}

// ecPoint decodes CKA_EC_POINT. PKCS#11 says it is the DER OCTET STRING
// holding the X9.62 point, and both SoftHSM2 and NSS softokn answer so;
// some tokens give the bare point, which is accepted too.
func ecPoint(v []byte) ([]byte, error) {
	if len(v) == 65 && v[0] == 4 {
		return v, nil
	}
	var p []byte
	rest, err := asn1.Unmarshal(v, &p)
	if err != nil || len(rest) != 0 {
		return nil, fmt.Errorf("CKA_EC_POINT is neither a DER OCTET STRING nor an uncompressed point (%d bytes)", len(v))
	}
	return p, nil
}

// kekAttrs is the KEK: AES-256, sensitive, never extractable, wrap and
// unwrap only, with KEKUnwrapTemplate (unwrapT).
func kekAttrs(label string, id []byte, token, private bool, unwrapT *pkcs11.Attribute) []*pkcs11.Attribute {
	return append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_TOKEN, token), attr(pkcs11.CKA_PRIVATE, private),
		attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), unwrapT,
	}, usages(secretUsages, pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP)...)
}

func kekFind(label string, id []byte) []*pkcs11.Attribute {
	f := []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_LABEL, label)}
	if id != nil {
		f = append(f, attr(pkcs11.CKA_ID, id))
	}
	return f
}

// GenerateKEK generates the key-encryption key under which K_I is stored,
// as a private token object labelled label.
//
// On a token that enforces CKA_WRAP_WITH_TRUSTED (the table says so:
// SoftHSM2) the KEK must be CKA_TRUSTED, which only the security officer
// may set, and soPIN is required. SoftHSM2 lets the SO create only public
// objects, and stores public objects unencrypted in its token directory,
// so the KEK is never made a public token object: the SO generates it as
// a public, trusted *session* object (with KEKUnwrapTemplate), the user
// copies it into a private token object (CKA_TRUSTED is copied; the value
// is stored encrypted under the user PIN), and the session original is
// destroyed. On other tokens soPIN is not used.
func (t *Token) GenerateKEK(ctx context.Context, label, soPIN string) (*KEKRef, error) {
	return t.generateKEK(ctx, label, soPIN, false)
}

func (t *Token) generateKEK(ctx context.Context, label, soPIN string, replicable bool) (*KEKRef, error) {
	if label == "" {
		return nil, errors.New("generate KEK: empty label")
	}
	ref := &KEKRef{Label: label, ID: newID(), Replicable: replicable, tok: t}
	ref.obj.find = kekFind(label, ref.ID)
	var err error
	if t.mech.EnforcesWrapWithTrusted {
		if soPIN == "" {
			return nil, fmt.Errorf("generate KEK %q: token %q enforces CKA_WRAP_WITH_TRUSTED, so the security officer must mark the KEK trusted: give the SO PIN (--so-pin-file or BLINDPERSO_SO_PIN)", label, t.info.Label)
		}
		ref.Trusted = true
		err = t.exclusive(ctx, func(ps *pooled) error { return t.trustedKEK(ps, ref, soPIN) })
	} else if replicable {
		err = t.ReplicationRefusal()
	} else {
		err = t.With(ctx, func(s Session) error {
			if hs, err := findObjects(s, ref.obj.find, 1); err != nil || len(hs) == 1 {
				if err == nil {
					ref.obj.set(t, hs[0]) // made by a first attempt
				}
				return err
			}
			if err := labelFree(s, label); err != nil {
				return err
			}
			ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, KEKUnwrapTemplate)
			if err != nil {
				return err
			}
			defer ut.free()
			m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
			h, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, append(kekAttrs(label, ref.ID, true, true, ut.attr), locked(t.mech, false)...))
			if err != nil {
				return Call("C_GenerateKey", m, err)
			}
			ref.obj.set(t, h)
			return nil
		})
	}
	if err != nil {
		return nil, fmt.Errorf("generate KEK %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

// trustedKEK runs the SO-then-user sequence of GenerateKEK in one
// session: a session object survives the change of login.
func (t *Token) trustedKEK(ps *pooled, ref *KEKRef, soPIN string) error {
	s := t.session(ps)
	if err := labelFree(s, ref.Label); err != nil {
		return err
	}
	ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, KEKUnwrapTemplate)
	if err != nil {
		return err
	}
	defer ut.free()
	// Modifiable and copyable for the moment it lives: SoftHSM2 refuses
	// every changing copy of a read-only object, and the user's copy
	// (trustedToPrivate) makes it read-only (CKA_MODIFIABLE may go from true to false
	// in a copy). CKA_COPYABLE cannot be cleared in a copy there
	// (CKR_ATTRIBUTE_READ_ONLY): the KEK stays copyable, but only
	// unchanged (`issuer probe`, path kek-copy-*).
	tmpl := append(kekAttrs(ref.Label, ref.ID, false, false, ut.attr), attr(pkcs11.CKA_TRUSTED, true))
	if ref.Replicable {
		tmpl = replicableAttrs(tmpl)
	}
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
	h, err := t.trustedToPrivate(ps, soPIN, func(s Session) (pkcs11.ObjectHandle, error) {
		h, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, tmpl)
		return h, Call("C_GenerateKey", m, err)
	})
	if err != nil {
		return err
	}
	ref.obj.set(t, h)
	return nil
}

// trustedToPrivate makes a trusted KEK as the SO (make returns a public
// session object: only the SO may set CKA_TRUSTED), copies it into a
// private, read-only token object as the user and destroys the session
// original. A session object survives the change of login; either the
// token object is there and the original gone, or an error and neither.
func (t *Token) trustedToPrivate(ps *pooled, soPIN string, make func(Session) (pkcs11.ObjectHandle, error)) (pkcs11.ObjectHandle, error) {
	var tmp pkcs11.ObjectHandle
	err := t.asSO(ps, soPIN, func(s Session) error {
		var err error
		tmp, err = make(s)
		return err
	})
	s := t.session(ps)
	if err != nil {
		if tmp != 0 {
			s.P.DestroyObject(s.H, tmp)
		}
		return 0, err
	}
	h, err := s.P.CopyObject(s.H, tmp, []*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_MODIFIABLE, false)})
	if derr := s.P.DestroyObject(s.H, tmp); derr != nil && err == nil {
		s.P.DestroyObject(s.H, h)
		return 0, fmt.Errorf("destroy the SO's session copy of the KEK: %w", Call("C_DestroyObject", nil, derr))
	}
	if err != nil {
		return 0, fmt.Errorf("copy the SO's trusted KEK into a private token object: %w", Call("C_CopyObject", nil, err))
	}
	return h, nil
}

// FindKEK finds the KEK labelled label.
func (t *Token) FindKEK(ctx context.Context, label string) (*KEKRef, error) {
	ref := &KEKRef{Label: label, tok: t}
	err := t.With(ctx, func(s Session) error {
		h, err := findOne(s, kekFind(label, nil), "secret key")
		if err != nil {
			return err
		}
		a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_ID, nil)})
		if err != nil {
			return Call("C_GetAttributeValue", nil, err)
		}
		ref.ID = a[0].Value
		// NSS softokn does not know CKA_TRUSTED on keys: not trusted.
		a, err = s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_TRUSTED, nil)})
		ref.Trusted = err == nil && len(a[0].Value) == 1 && a[0].Value[0] != 0
		ref.Replicable = flagAttr(s, h, pkcs11.CKA_EXTRACTABLE)
		ref.obj.find = kekFind(label, ref.ID)
		ref.obj.set(t, h)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find KEK %q on token %q: %w", label, t.info.Label, err)
	}
	return ref, nil
}

// ckAttributeSize is sizeof(CK_ATTRIBUTE) here: the length of an array
// attribute's value is this times its number of attributes.
var ckAttributeSize = int(C.sizeof_bp_keys_attribute)

// boolTemplate lays out an array attribute value (CKA_UNWRAP_TEMPLATE) of
// CK_BBOOL attributes in C memory, which miekg/pkcs11 v1.1.2 cannot
// marshal: the outer array's bytes go in the attribute (miekg copies
// them), the values they point to stay in C memory until free.
func boolTemplate(attrs map[uint]bool) ([]byte, func(), error) {
	n := len(attrs)
	types := make([]C.ulong, 0, n)
	values := make([]C.uchar, 0, n)
	for typ, v := range attrs {
		types = append(types, C.ulong(typ))
		b := C.uchar(0)
		if v {
			b = 1
		}
		values = append(values, b)
	}
	p := C.bp_keys_bool_template(&types[0], &values[0], C.int(n))
	if p == nil {
		return nil, nil, errors.New("out of C memory")
	}
	b := C.GoBytes(p, C.int(n*int(C.sizeof_bp_keys_attribute)))
	return b, func() { C.free(p) }, nil
}

// findObjects returns up to max handles of objects matching tmpl.
func findObjects(s Session, tmpl []*pkcs11.Attribute, max int) ([]pkcs11.ObjectHandle, error) {
	if err := s.P.FindObjectsInit(s.H, tmpl); err != nil {
		return nil, Call("C_FindObjectsInit", nil, err)
	}
	hs, _, err := s.P.FindObjects(s.H, max)
	if ferr := s.P.FindObjectsFinal(s.H); err == nil && ferr != nil {
		err = ferr
	}
	if err != nil {
		return nil, Call("C_FindObjects", nil, err)
	}
	return hs, nil
}

// findAll returns the handles of every object matching tmpl, in batches
// until the token has no more.
func findAll(s Session, tmpl []*pkcs11.Attribute) ([]pkcs11.ObjectHandle, error) {
	if err := s.P.FindObjectsInit(s.H, tmpl); err != nil {
		return nil, Call("C_FindObjectsInit", nil, err)
	}
	var out []pkcs11.ObjectHandle
	for {
		hs, _, err := s.P.FindObjects(s.H, 100)
		if err != nil {
			s.P.FindObjectsFinal(s.H)
			return nil, Call("C_FindObjects", nil, err)
		}
		if len(hs) == 0 {
			break
		}
		out = append(out, hs...)
	}
	if err := s.P.FindObjectsFinal(s.H); err != nil {
		return nil, Call("C_FindObjectsFinal", nil, err)
	}
	return out, nil
}

// findOne returns the one object matching tmpl; none or several is an
// error naming what was looked for.
func findOne(s Session, tmpl []*pkcs11.Attribute, what string) (pkcs11.ObjectHandle, error) {
	hs, err := findObjects(s, tmpl, 2)
	if err != nil {
		return 0, err
	}
	switch len(hs) {
	case 0:
		return 0, fmt.Errorf("no %s with this label", what)
	case 1:
		return hs[0], nil
	}
	return 0, fmt.Errorf("several %s objects with this label; labels must be unique", what)
}

// labelFree refuses a label that any object of the token already has:
// the issuer finds its keys by label, so two would be ambiguous.
func labelFree(s Session, label string) error {
	hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label)}, 1)
	if err != nil {
		return err
	}
	if len(hs) > 0 {
		return fmt.Errorf("an object labelled %q already exists (labels must be unique; choose another or delete it)", label)
	}
	return nil
}

// newID is a fresh random CKA_ID.
func newID() []byte {
	id := make([]byte, 16)
	rand.Read(id)
	return id
}

// DestroyLabel destroys every object of the token labelled label (the
// PIN-holder adversary's throwaway keys: a key pair shares its label) and
// returns how many it destroyed. A KEK is destroyed by DestroyKEK, which
// insists on exactly one.
func (t *Token) DestroyLabel(ctx context.Context, label string) (int, error) {
	n := 0
	err := t.With(ctx, func(s Session) error {
		for {
			hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label)}, 16)
			if err != nil || len(hs) == 0 {
				return err
			}
			for _, h := range hs {
				if err := s.P.DestroyObject(s.H, h); err != nil {
					return Call("C_DestroyObject", nil, err)
				}
				n++
			}
		}
	})
	return n, err
}
