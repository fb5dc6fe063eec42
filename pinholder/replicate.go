package pinholder

import (
	"context"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/protocol"
)

// The paths of replicable keys and of their replication between members
// (hsm/replicate.go; docs/HSM.md, "Replicating keys between members"):
// what a holder of the user PIN can do with an issuer key or KEK that is
// extractable under trusted keys, and with what a replication left.
const (
	RepSKWrapOwn         = "rep-sk-wrap-under-own-key"
	RepSKWrapOwnTrusted  = "rep-sk-wrap-under-own-trusted-key"
	RepSKSetNoWWT        = "rep-sk-set-no-wrap-with-trusted"
	RepSKSetNotSensitive = "rep-sk-set-not-sensitive"
	RepSKCopyNoWWT       = "rep-sk-copy-no-wrap-with-trusted"
	RepSKWrapKEK         = "rep-sk-wrap-under-kek"
	RepSKWrapKTK         = "rep-sk-wrap-under-ktk"
	RepECWrapOwn         = "rep-ec-wrap-under-own-key"
	RepKEKWrapOwn        = "rep-kek-wrap-under-own-key"
	RepKEKWrapOwnTrusted = "rep-kek-wrap-under-own-trusted-key"
	RepKEKSetNoWWT       = "rep-kek-set-no-wrap-with-trusted"
	RepKEKCopyNoWWT      = "rep-kek-copy-no-wrap-with-trusted"
	RepKEKWrapKTK        = "rep-kek-wrap-under-ktk"
	RepKEKWrapItself     = "rep-kek-wrap-under-itself"
	RepImportKeyLeftover = "replication-import-key-leftover"
	RepTransportLeftover = "replication-transport-leftover"
)

const (
	needRep need = iota + 16
	needTransport
)

// rep is what the replication paths attack.
type rep struct {
	// The replicable keys (with Options.Replicable or a Peer, the ones
	// every path attacks; on the receiving member, the replicas).
	rsa, ec *hsm.IssuerKeyRef
	kek     *hsm.KEKRef
	// A card under rsa (S and c) and one under ec whose K_I is stored
	// under kek (blob).
	s32, cRSA []byte
	cEC, ki   []byte
	blob      hsm.Blob
	// skip says why the replication paths are not tried.
	skip string
	// The replication, if there was one: its transport as it crossed
	// the host, and which side of it this token was.
	tr            *hsm.Transport
	target        bool
	skipTransport string
}

func (e *env) skipReplication(n need) string {
	switch n {
	case needRep:
		return e.rep.skip
	case needTransport:
		if e.rep.skip != "" {
			return e.rep.skip
		}
		return e.rep.skipTransport
	}
	return ""
}

// setupReplication makes the replicable throwaway keys (on the Peer, if
// it is the source, and replicates them; to the Peer if this token is).
func (e *env) setupReplication(ctx context.Context) error {
	main := e.opt.Replicable || e.opt.Peer != nil
	e.rep.skipTransport = "no second member (Options.Peer): no replication was made whose transport to try"
	if err := e.tok.ReplicationRefusal(); err != nil {
		e.rep.skip = "replicable keys are refused on this token: it does not enforce CKA_WRAP_WITH_TRUSTED (hsm.ReplicationRefusal)"
		if main {
			return err
		}
		return nil
	}
	if e.opt.SOPIN == "" {
		e.rep.skip = "no SO PIN: a replicable KEK is made trusted by the SO, as the ceremony does (--so-pin-file)"
		if main {
			return errors.New("replicable keys need the SO PIN (Options.SOPIN)")
		}
		return nil
	}
	where, whereSO := e.tok, e.opt.SOPIN
	if e.opt.Peer != nil && e.opt.PeerIsSource {
		where, whereSO = e.opt.Peer, e.opt.PeerSOPIN
	}
	var err error
	r := &e.rep
	if r.rsa, err = where.GenerateReplicableIssuerKey(ctx, hsm.KindRSA2048, e.label("rep-rsa")); err != nil {
		return err
	}
	if r.ec, err = where.GenerateReplicableIssuerKey(ctx, hsm.KindP256, e.label("rep-ec")); err != nil {
		return err
	}
	if r.kek, err = where.GenerateReplicableKEK(ctx, e.label("rep-kek"), whereSO); err != nil {
		return err
	}
	if p := e.opt.Peer; p != nil {
		x := hsm.Replication{Source: e.tok, Target: p, SourceSOPIN: e.opt.SOPIN, TargetSOPIN: e.opt.PeerSOPIN,
			Keys: []*hsm.IssuerKeyRef{r.rsa, r.ec}, KEK: r.kek, Capture: func(t *hsm.Transport) { r.tr = t }}
		if e.opt.PeerIsSource {
			x.Source, x.Target, x.SourceSOPIN, x.TargetSOPIN = p, e.tok, e.opt.PeerSOPIN, e.opt.SOPIN
		}
		res, err := hsm.Replicate(ctx, x)
		if err != nil {
			return err
		}
		r.skipTransport = ""
		if e.opt.PeerIsSource {
			r.target = true
			r.rsa, r.ec, r.kek = res.Keys[0], res.Keys[1], res.KEK
		}
	}
	if main {
		e.rsa, e.ec, e.kek = r.rsa, r.ec, r.kek
	}
	r.s32 = make([]byte, protocol.OAEPSecretLen)
	rand.Read(r.s32)
	if r.cRSA, err = protocol.EncryptSecret(protocol.RSAOAEPAES, r.rsa.Public, r.s32, rand.Reader); err != nil {
		return err
	}
	p := protocol.ECDHP256AES
	var z []byte
	if z, r.cEC, err = protocol.Encapsulate(p, r.ec.Public, rand.Reader); err != nil {
		return err
	}
	r.ki, err = protocol.DeriveKey(p, z, protocol.Binding(p, r.ec.Public.SPKI))
	return err
}

// repBlobs stores the EC card's K_I under the replicable KEK.
func (e *env) repBlobs(s hsm.Session) error {
	r := &e.rep
	if r.ec == nil {
		return nil
	}
	sk, err := r.ec.Handle(s)
	if err != nil {
		return err
	}
	kek, err := r.kek.Handle(s)
	if err != nil {
		return err
	}
	r.blob, err = hsm.ImportCard(s, protocol.ECDHP256AES, sk, kek, r.ec.Public.SPKI, r.cEC)
	return err
}

func init() {
	paths = append(paths, replicationPaths...)
}

var replicationPaths = []path{
	{RepSKWrapOwn, "replicable issuer key (RSA)", "C_WrapKey(own key, replicable SK), decrypt on the host", "SK (PKCS#8), so every S",
		"CKA_WRAP_WITH_TRUSTED on the replicable key, enforced (SoftHSM2; replicable keys are refused where it is not)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.privOut(s, own, val, e.repRSAH(s), e.rep.rsa)
		}},
	{RepSKWrapOwnTrusted, "replicable issuer key (RSA)", "make an AES key with CKA_TRUSTED true as the user, wrap the replicable SK under it", "SK (PKCS#8)",
		"only the security officer may set CKA_TRUSTED (SoftHSM2)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			own, val, err := e.ownKey(s, attr(pkcs11.CKA_TRUSTED, true))
			if err != nil {
				return "", err
			}
			return e.privOut(s, own, val, e.repRSAH(s), e.rep.rsa)
		}},
	{RepSKSetNoWWT, "replicable issuer key (RSA)", "C_SetAttributeValue(SK, CKA_WRAP_WITH_TRUSTED false), then wrap it under the attacker's own key", "SK (PKCS#8)",
		"CKA_MODIFIABLE false, and CKA_WRAP_WITH_TRUSTED is one-way (PKCS#11)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			h := e.repRSAH(s)
			if err := refused("C_SetAttributeValue(CKA_WRAP_WITH_TRUSTED false)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_WRAP_WITH_TRUSTED, false)})); err != nil {
				return "", err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.privOut(s, own, val, h, e.rep.rsa)
		}},
	{RepSKSetNotSensitive, "replicable issuer key (RSA)", "C_SetAttributeValue(SK, CKA_SENSITIVE false), then read CKA_PRIVATE_EXPONENT", "SK",
		"CKA_SENSITIVE is one-way (PKCS#11) and CKA_MODIFIABLE false", needRep,
		func(e *env, s hsm.Session) (string, error) {
			h := e.repRSAH(s)
			if err := refused("C_SetAttributeValue(CKA_SENSITIVE false)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_SENSITIVE, false)})); err != nil {
				return "", err
			}
			a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_PRIVATE_EXPONENT, nil)})
			if err := refused("C_GetAttributeValue(CKA_PRIVATE_EXPONENT)", err); err != nil {
				return "", err
			}
			return fmt.Sprintf("the private exponent on the host (%d bytes)", len(a[0].Value)), nil
		}},
	{RepSKCopyNoWWT, "replicable issuer key (RSA)", "C_CopyObject(SK, {CKA_TOKEN false, CKA_WRAP_WITH_TRUSTED false}), wrap the copy under the attacker's own key", "SK (PKCS#8)",
		"CKA_COPYABLE false, CKA_MODIFIABLE false, and CKA_WRAP_WITH_TRUSTED one-way", needRep,
		func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.repRSAH(s), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, false))
			if err != nil {
				return "", err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.privOut(s, own, val, c, e.rep.rsa)
		}},
	{RepSKWrapKEK, "replicable issuer key (RSA)", "C_WrapKey(the trusted KEK, replicable SK) — allowed —, C_UnwrapKey(KEK, that) into a private key with CKA_DECRYPT, C_Decrypt c", "S, hence K_I",
		"the KEK's CKA_UNWRAP_TEMPLATE (KEKUnwrapTemplate: nothing unwrapped under it decrypts; SoftHSM2 also refuses its secret-key attributes on a private key)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			kek, err := e.rep.kek.Handle(s)
			if err != nil {
				return "", err
			}
			m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
			w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, kek, e.repRSAH(s))
			if err := refused("C_WrapKey(KEK, replicable SK)", err); err != nil {
				return "", err
			}
			k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kek, w, []*pkcs11.Attribute{
				attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA), attr(pkcs11.CKA_TOKEN, false),
				attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_DECRYPT, true)})
			if err := refused("C_UnwrapKey(KEK, the wrapped SK) with CKA_DECRYPT", err); err != nil {
				return "", err
			}
			e.keep(k)
			return e.oaepDecryptWith(s, k, e.rep.cRSA, e.rep.s32)
		}},
	{RepSKWrapKTK, "replicable issuer key (RSA)", "C_WrapKey(a receiver's trusted KTK, replicable SK): the receiver opens it", "SK (PKCS#8), at the receiver",
		"the trusted KTK's CKA_WRAP_TEMPLATE (hsm.KTKWrapTemplate: only a key that cannot wrap, unwrap or derive; a private key has no CKA_WRAP)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			ktk, err := e.ktk.Handle(s)
			if err != nil {
				return "", err
			}
			return e.privOut(s, ktk, e.ktkValue, e.repRSAH(s), e.rep.rsa)
		}},
	{RepECWrapOwn, "replicable issuer key (EC)", "C_WrapKey(own key, replicable EC SK), decrypt on the host", "the EC private key, so every Z",
		"CKA_WRAP_WITH_TRUSTED on the replicable key, enforced (SoftHSM2)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			h, err := e.rep.ec.Handle(s)
			if err != nil {
				return "", err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.privOut(s, own, val, h, e.rep.ec)
		}},
	{RepKEKWrapOwn, "replicable KEK", "C_WrapKey(own key, replicable KEK), decrypt on the host", "the KEK, so every stored K_I",
		"CKA_WRAP_WITH_TRUSTED on the replicable KEK, enforced (SoftHSM2)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.kekOut(s, own, val, e.repKEKH(s))
		}},
	{RepKEKWrapOwnTrusted, "replicable KEK", "make an AES key with CKA_TRUSTED true as the user, wrap the replicable KEK under it", "the KEK",
		"only the security officer may set CKA_TRUSTED (SoftHSM2)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			own, val, err := e.ownKey(s, attr(pkcs11.CKA_TRUSTED, true))
			if err != nil {
				return "", err
			}
			return e.kekOut(s, own, val, e.repKEKH(s))
		}},
	{RepKEKSetNoWWT, "replicable KEK", "C_SetAttributeValue(KEK, CKA_WRAP_WITH_TRUSTED false), then wrap it under the attacker's own key", "the KEK",
		"CKA_MODIFIABLE false, and CKA_WRAP_WITH_TRUSTED is one-way", needRep,
		func(e *env, s hsm.Session) (string, error) {
			h := e.repKEKH(s)
			if err := refused("C_SetAttributeValue(CKA_WRAP_WITH_TRUSTED false)", s.P.SetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_WRAP_WITH_TRUSTED, false)})); err != nil {
				return "", err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.kekOut(s, own, val, h)
		}},
	{RepKEKCopyNoWWT, "replicable KEK", "C_CopyObject(KEK, {CKA_TOKEN false, CKA_WRAP_WITH_TRUSTED false}), wrap the copy under the attacker's own key", "the KEK",
		"CKA_MODIFIABLE false (SoftHSM2 refuses every changing copy of a read-only object), and CKA_WRAP_WITH_TRUSTED one-way", needRep,
		func(e *env, s hsm.Session) (string, error) {
			c, err := e.copy(s, e.repKEKH(s), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, false))
			if err != nil {
				return "", err
			}
			own, val, err := e.ownKey(s)
			if err != nil {
				return "", err
			}
			return e.kekOut(s, own, val, c)
		}},
	{RepKEKWrapKTK, "replicable KEK", "C_WrapKey(a receiver's trusted KTK, replicable KEK): the receiver opens it", "the KEK, at the receiver: every stored K_I",
		"the trusted KTK's CKA_WRAP_TEMPLATE (hsm.KTKWrapTemplate: CKA_WRAP false)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			ktk, err := e.ktk.Handle(s)
			if err != nil {
				return "", err
			}
			return e.kekOut(s, ktk, e.ktkValue, e.repKEKH(s))
		}},
	{RepKEKWrapItself, "replicable KEK", "C_WrapKey(KEK, KEK) — allowed —, C_UnwrapKey(KEK, that) into a decrypting key, AES-ECB-decrypt a stored blob", "every stored K_I",
		"the KEK's CKA_UNWRAP_TEMPLATE (KEKUnwrapTemplate: CKA_DECRYPT false)", needRep,
		func(e *env, s hsm.Session) (string, error) {
			kek := e.repKEKH(s)
			m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
			w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, kek, kek)
			if err := refused("C_WrapKey(KEK, KEK)", err); err != nil {
				return "", err
			}
			k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kek, w, append(readable(pkcs11.CKK_AES)[:3],
				attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_DECRYPT, true)))
			if err := refused("C_UnwrapKey(KEK, the wrapped KEK) with CKA_DECRYPT", err); err != nil {
				return "", err
			}
			e.keep(k)
			return e.repBlobByOracle(s, k)
		}},
	{RepImportKeyLeftover, "replication transport", "after a replication: find the replication-import key and the receiving transport key (by label, or by the handles the ceremony process had), unwrap the captured transport blob, then the captured SK blob into a readable key; on the source, the trusted transport key wrapped under a receiver's KTK", "SK (and the KEK) of the replication",
		"the replication's objects are session objects of the ceremony process (never token objects), destroyed when it ends; TransportUnwrapTemplate and CKA_WRAP_WITH_TRUSTED while they live", needTransport,
		func(e *env, s hsm.Session) (string, error) { return e.leftoverImportKey(s) }},
	{RepTransportLeftover, "replication transport", "after a replication: the transport key left in the token (by label, or by the ceremony process's handle): on the target, unwrap the captured SK blob under it into a readable key; on the source, wrap it under the attacker's own key and open the captured SK blob on the host", "SK (and the KEK) of the replication",
		"the replication's transport keys are session objects of the ceremony process, destroyed when it ends", needTransport,
		func(e *env, s hsm.Session) (string, error) { return e.leftoverTransport(s) }},
}

func (e *env) repRSAH(s hsm.Session) pkcs11.ObjectHandle { h, _ := e.rep.rsa.Handle(s); return h }
func (e *env) repKEKH(s hsm.Session) pkcs11.ObjectHandle { h, _ := e.rep.kek.Handle(s); return h }

// privOut is wrapOut of a private key, confirmed: the PKCS#8 that came
// out must hold k's public key.
func (e *env) privOut(s hsm.Session, own pkcs11.ObjectHandle, val []byte, target pkcs11.ObjectHandle, k *hsm.IssuerKeyRef) (string, error) {
	got, err := e.wrapOut(s, own, val, target)
	if err != nil {
		return "", err
	}
	return confirmPKCS8(got, k)
}

// confirmPKCS8 checks that b (a PKCS#8 PrivateKeyInfo, perhaps padded)
// is the private key of k.
func confirmPKCS8(b []byte, k *hsm.IssuerKeyRef) (string, error) {
	var raw asn1.RawValue
	if _, err := asn1.Unmarshal(b, &raw); err != nil {
		return "", fmt.Errorf("the attack's output is not a PKCS#8 key: %w", err)
	}
	key, err := x509.ParsePKCS8PrivateKey(raw.FullBytes)
	if err != nil {
		return "", fmt.Errorf("the attack's output is not a PKCS#8 key: %w", err)
	}
	var pub any
	switch p := key.(type) {
	case *rsa.PrivateKey:
		pub = &p.PublicKey
	case *ecdsa.PrivateKey:
		if pub, err = p.PublicKey.ECDH(); err != nil {
			return "", err
		}
	case *ecdh.PrivateKey:
		pub = p.PublicKey()
	default:
		return "", fmt.Errorf("the attack's output is a %T", key)
	}
	spki, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return "", err
	}
	if string(spki) != string(k.Public.SPKI) {
		return "", errors.New("the attack's output is a private key, but not the issuer key's: the path is not what it seems")
	}
	return fmt.Sprintf("the issuer private key %s on the host (PKCS#8, %d bytes, its public key the issuer key's)", k.Label, len(raw.FullBytes)), nil
}

// kekOut is wrapOut of the KEK, confirmed: the value that came out must
// open the stored blob to the card's K_I.
func (e *env) kekOut(s hsm.Session, own pkcs11.ObjectHandle, val []byte, target pkcs11.ObjectHandle) (string, error) {
	got, err := e.wrapOut(s, own, val, target)
	if err != nil {
		return "", err
	}
	dec, err := aesDecrypter(got)
	if err != nil {
		return "", fmt.Errorf("the attack's output is not an AES key: %w", err)
	}
	ki, err := unwrapKWP(dec, e.rep.blob.Wrapped)
	if err != nil {
		return "", fmt.Errorf("the attack's output does not open the stored blob: %w", err)
	}
	out, err := confirm(ki, e.rep.ki, "K_I")
	return "the KEK on the host; with it " + out, err
}

func (e *env) oaepDecryptWith(s hsm.Session, h pkcs11.ObjectHandle, c, want []byte) (string, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
	if err := refused("C_DecryptInit(CKM_RSA_PKCS_OAEP)", s.P.DecryptInit(s.H, []*pkcs11.Mechanism{m}, h)); err != nil {
		return "", err
	}
	out, err := s.P.Decrypt(s.H, c)
	if err := refused("C_Decrypt", err); err != nil {
		return "", err
	}
	return confirm(out, want, "S")
}

func (e *env) repBlobByOracle(s hsm.Session, h pkcs11.ObjectHandle) (string, error) {
	return decryptBlobByOracle(s, h, e.rep.blob.Wrapped, e.rep.ki)
}

// gone is a refusal for a step on an object that no longer exists: for
// the leftover paths, an invalid handle is the token's answer.
func gone(step string, err error) error {
	if err == nil {
		return nil
	}
	if rv, ok := hsm.RV(err); ok {
		return &refusal{step: step, rv: rvName(rv)}
	}
	return fmt.Errorf("%s: %w", step, err)
}

// leftover finds the replication's session object labelled label as an
// attacker can (C_FindObjects: another process sees none), else returns
// the handle the ceremony process had.
func leftover(s hsm.Session, label string, captured pkcs11.ObjectHandle) (pkcs11.ObjectHandle, string) {
	if err := s.P.FindObjectsInit(s.H, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, label)}); err == nil {
		hs, _, _ := s.P.FindObjects(s.H, 1)
		s.P.FindObjectsFinal(s.H)
		if len(hs) == 1 {
			return hs[0], "found by label"
		}
	}
	return captured, "none found by label; the ceremony process's handle"
}

// readablePrivate is a private key the attacker can read.
func readablePrivate(keyType uint) []*pkcs11.Attribute {
	return []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, pkcs11.CKO_PRIVATE_KEY), attr(pkcs11.CKA_KEY_TYPE, keyType),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, false), attr(pkcs11.CKA_EXTRACTABLE, true)}
}

// readExponent reads a private key's CKA_PRIVATE_EXPONENT and compares
// the key with k by its modulus.
func readExponent(s hsm.Session, h pkcs11.ObjectHandle, k *hsm.IssuerKeyRef) (string, error) {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_PRIVATE_EXPONENT, nil), attr(pkcs11.CKA_MODULUS, nil)})
	if err := refused("C_GetAttributeValue(CKA_PRIVATE_EXPONENT)", err); err != nil {
		return "", err
	}
	if new(big.Int).SetBytes(a[1].Value).Cmp(k.Public.RSA.N) != 0 {
		return "", errors.New("the attack's key is not the issuer key")
	}
	return fmt.Sprintf("the private exponent of %s on the host (%d bytes)", k.Label, len(a[0].Value)), nil
}

// leftoverImportKey: on the target, the replication-import key and the
// captured transport blob; on the source, the trusted transport key
// under a receiver's KTK.
func (e *env) leftoverImportKey(s hsm.Session) (string, error) {
	tr := e.rep.tr
	if !e.rep.target {
		// Source: the trusted transport key (labels[1], handles[1]),
		// wrapped under the genuine KTK, opens at its receiver, and with
		// it the captured SK blob.
		h, how := leftover(s, tr.SourceLabels[1], tr.SourceHandles[1])
		ktk, err := e.ktk.Handle(s)
		if err != nil {
			return "", err
		}
		m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
		w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{m}, ktk, h)
		if err := gone("C_WrapKey(the KTK, the transport key: "+how+")", err); err != nil {
			return "", err
		}
		dec, err := aesDecrypter(e.ktkValue)
		if err != nil {
			return "", err
		}
		t, err := unwrapKWP(dec, w)
		if err != nil {
			return "", err
		}
		return e.openCaptured(t)
	}
	h, how := leftover(s, tr.TargetLabels[0], tr.TargetHandles[1])
	t := append(policy(hsm.TransportUnwrapTemplate), attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES))
	tk, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{hsm.KeyImportOAEP()}, h, tr.WrappedTransport, t)
	if err := gone("C_UnwrapKey(the replication-import key: "+how+", the captured transport blob)", err); err != nil {
		return "", err
	}
	e.keep(tk)
	return e.unwrapCaptured(s, tk)
}

// leftoverTransport: the transport key left on this side.
func (e *env) leftoverTransport(s hsm.Session) (string, error) {
	tr := e.rep.tr
	if !e.rep.target {
		// Source: the transport key wrapped under the attacker's own
		// key, then the captured SK blob opened on the host with it.
		h, how := leftover(s, tr.SourceLabels[1], tr.SourceHandles[1])
		own, val, err := e.ownKey(s)
		if err != nil {
			return "", err
		}
		t, err := e.wrapOut(s, own, val, h)
		if err := gone("C_WrapKey(own key, the transport key: "+how+")", err); err != nil {
			return "", err
		}
		return e.openCaptured(t)
	}
	h, how := leftover(s, tr.TargetLabels[1], tr.TargetHandles[2])
	return e.unwrapCapturedAs(s, h, how)
}

func (e *env) unwrapCaptured(s hsm.Session, tk pkcs11.ObjectHandle) (string, error) {
	return e.unwrapCapturedAs(s, tk, "unwrapped")
}

// unwrapCapturedAs unwraps the captured SK blob under the transport key
// h into a readable private key.
func (e *env) unwrapCapturedAs(s hsm.Session, h pkcs11.ObjectHandle, how string) (string, error) {
	m := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
	k, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, h, e.rep.tr.Wrapped[e.rep.rsa.Label], readablePrivate(pkcs11.CKK_RSA))
	if err := gone("C_UnwrapKey(the transport key: "+how+", the captured SK blob) into a readable key", err); err != nil {
		return "", err
	}
	e.keep(k)
	return readExponent(s, k, e.rep.rsa)
}

// openCaptured opens the captured SK blob on the host with the transport
// key's value t.
func (e *env) openCaptured(t []byte) (string, error) {
	dec, err := aesDecrypter(t)
	if err != nil {
		return "", err
	}
	b, err := unwrapKWP(dec, e.rep.tr.Wrapped[e.rep.rsa.Label])
	if err != nil {
		return "", err
	}
	return confirmPKCS8(b, e.rep.rsa)
}
