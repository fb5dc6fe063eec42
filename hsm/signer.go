package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"

	"github.com/miekg/pkcs11"
)

// SigningKey is an EC P-256 signing key pair in a token, used to sign
// ceremony transcripts. Its private key is sensitive, never extractable
// and can only sign (CKA_SIGN; no derive, decrypt or unwrap). It
// implements crypto.Signer over Token.With, so it shares the Token's
// module and sessions: ThalesGroup/crypto11 was not used because its
// Configure calls C_Initialize itself (and fails with
// CKR_CRYPTOKI_ALREADY_INITIALIZED once this package has initialized the
// library), cannot pass NSS softokn's pReserved, and its Close calls
// C_Finalize, which would pull the library from under every other Token
// of the process.
type SigningKey struct {
	Label string
	ID    []byte
	pub   *ecdsa.PublicKey
	spki  []byte

	tok  *Token
	priv handleCache
}

// signingKeyTemplates: the private key signs and does nothing else; the
// public key only verifies (transcripts are verified on the host, but
// NSS softokn's pairwise consistency test at generation signs and
// verifies, and answers CKR_KEY_TYPE_INCONSISTENT without CKA_VERIFY).
// Both are read-only.
func signingKeyTemplates(label string, id []byte, m *Mechanisms) (pub, priv []*pkcs11.Attribute) {
	common := func(class uint) []*pkcs11.Attribute {
		return append([]*pkcs11.Attribute{
			attr(pkcs11.CKA_CLASS, class), attr(pkcs11.CKA_TOKEN, true), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_EC),
			attr(pkcs11.CKA_LABEL, label), attr(pkcs11.CKA_ID, id),
		}, locked(m, false)...)
	}
	pub = append(append(common(pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_PRIVATE, false),
		attr(pkcs11.CKA_EC_PARAMS, ecParamsP256)), usages(publicUsages, pkcs11.CKA_VERIFY)...)
	priv = append(append(common(pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_PRIVATE, true),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false)), usages(privateUsages, pkcs11.CKA_SIGN)...)
	return pub, priv
}

// GenerateSigningKey generates an EC P-256 signing key pair in the token
// as token objects labelled label. A label already in use is refused.
func (t *Token) GenerateSigningKey(ctx context.Context, label string) (*SigningKey, error) {
	if label == "" {
		return nil, errors.New("generate signing key: empty label")
	}
	id := newID()
	k := &SigningKey{Label: label, ID: id, tok: t}
	k.priv.find = privateKeyFind(label, id)
	pubT, privT := signingKeyTemplates(label, id, t.mech)
	err := t.With(ctx, func(s Session) error {
		pubH, privH, err := generatePair(s, pkcs11.CKM_EC_KEY_PAIR_GEN, label, id, pubT, privT)
		if err != nil {
			return err
		}
		if err := k.export(s, pubH); err != nil {
			s.P.DestroyObject(s.H, privH)
			s.P.DestroyObject(s.H, pubH)
			return err
		}
		k.priv.set(t, privH)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("generate signing key %q on token %q: %w", label, t.info.Label, err)
	}
	return k, nil
}

// FindSigningKey finds the signing key pair labelled label.
func (t *Token) FindSigningKey(ctx context.Context, label string) (*SigningKey, error) {
	k := &SigningKey{Label: label, tok: t}
	err := t.With(ctx, func(s Session) error {
		privH, err := findOne(s, []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_LABEL, label)}, "private key")
		if err != nil {
			return err
		}
		a, err := s.P.GetAttributeValue(s.H, privH, []*pkcs11.Attribute{attr(pkcs11.CKA_ID, nil)})
		if err != nil {
			return Call("C_GetAttributeValue", nil, err)
		}
		k.ID = a[0].Value
		pubH, err := findOne(s, publicKeyFind(k.ID), "public key with the private key's CKA_ID")
		if err != nil {
			return err
		}
		if err := k.export(s, pubH); err != nil {
			return err
		}
		k.priv.find = privateKeyFind(label, k.ID)
		k.priv.set(t, privH)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("find signing key %q on token %q: %w", label, t.info.Label, err)
	}
	return k, nil
}

func (k *SigningKey) export(s Session, pubH pkcs11.ObjectHandle) error {
	a, err := s.P.GetAttributeValue(s.H, pubH, []*pkcs11.Attribute{attr(pkcs11.CKA_EC_PARAMS, nil), attr(pkcs11.CKA_EC_POINT, nil)})
	if err != nil {
		return Call("C_GetAttributeValue", nil, err)
	}
	if string(a[0].Value) != string(ecParamsP256) {
		return fmt.Errorf("signing key with CKA_EC_PARAMS %x, want P-256", a[0].Value)
	}
	point, err := ecPoint(a[1].Value)
	if err != nil {
		return err
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(elliptic.P256(), point)
	if err != nil {
		return fmt.Errorf("CKA_EC_POINT: %w", err)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return err
	}
	k.pub, k.spki = pub, spki
	return nil
}

// Handle returns the private key's handle for use in s (see
// IssuerKeyRef.Handle).
func (k *SigningKey) Handle(s Session) (pkcs11.ObjectHandle, error) { return k.priv.get(k.tok, s) }

// Public returns the *ecdsa.PublicKey.
func (k *SigningKey) Public() crypto.PublicKey { return k.pub }

// PublicKeyPEM is the public key as a PEM "PUBLIC KEY" block (SPKI).
func (k *SigningKey) PublicKeyPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: k.spki})
}

// Fingerprint is SHA-256 of the DER SubjectPublicKeyInfo.
func (k *SigningKey) Fingerprint() [32]byte { return sha256.Sum256(k.spki) }

// Sign signs digest (the hash of the message, whose length must match
// opts.HashFunc(): SHA-256 or another) with CKM_ECDSA in the token and
// returns the ASN.1 DER ECDSA-Sig-Value, as crypto.Signer requires. rand
// is not used: the token draws the nonce.
func (k *SigningKey) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	if h := opts.HashFunc(); h == 0 || len(digest) != h.Size() {
		return nil, fmt.Errorf("sign with %q: want the digest of a hash function (got %d bytes)", k.Label, len(digest))
	}
	var raw []byte
	err := k.tok.With(context.Background(), func(s Session) error {
		h, err := k.priv.get(k.tok, s)
		if err != nil {
			return err
		}
		m := pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)
		if err := s.P.SignInit(s.H, []*pkcs11.Mechanism{m}, h); err != nil {
			return Call("C_SignInit", m, err)
		}
		raw, err = s.P.Sign(s.H, digest)
		return Call("C_Sign", m, err)
	})
	if err != nil {
		return nil, fmt.Errorf("sign with %q on token %q: %w", k.Label, k.tok.info.Label, err)
	}
	return ecdsaRawToASN1(raw)
}

// ecdsaRawToASN1 turns PKCS#11's r ‖ s (each the size of the order) into
// the DER SEQUENCE { r INTEGER, s INTEGER }.
func ecdsaRawToASN1(raw []byte) ([]byte, error) {
	if len(raw) == 0 || len(raw)%2 != 0 {
		return nil, fmt.Errorf("CKM_ECDSA signature of %d bytes, want r ‖ s", len(raw))
	}
	n := len(raw) / 2
	r, s := new(big.Int).SetBytes(raw[:n]), new(big.Int).SetBytes(raw[n:])
	return asn1.Marshal(struct{ R, S *big.Int }{r, s})
}

// LabelInUse reports whether any object of the token has CKA_LABEL label
// (the ceremony refuses such labels before it creates anything).
func (t *Token) LabelInUse(ctx context.Context, label string) (bool, error) {
	var used bool
	err := t.With(ctx, func(s Session) error {
		hs, err := findObjects(s, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label)}, 1)
		if err != nil {
			return err
		}
		used = len(hs) > 0
		return nil
	})
	return used, err
}

// CountObjects counts the objects of the token visible to the logged-in
// user (session objects of this process included), for tests and for the
// ceremony's dry-run check.
func (t *Token) CountObjects(ctx context.Context) (int, error) {
	n := 0
	err := t.With(ctx, func(s Session) error {
		hs, err := findAll(s, nil)
		n = len(hs)
		return err
	})
	return n, err
}
