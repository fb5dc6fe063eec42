package hsm

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/big"
	"sort"
	"strings"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// Replication: copying the issuer keys and the KEK from one member of a
// group to another inside the tokens, for tokens without a vendor's
// cloning (SoftHSM2). docs/HSM.md, "Replicating keys between members",
// and docs/OPERATIONS.md, "Replicating keys to another member", say why
// each object is as it is; in short:
//
//   - Keys made to be replicated ("replicable") are the ceremony's keys
//     with CKA_EXTRACTABLE true and CKA_WRAP_WITH_TRUSTED true (still
//     sensitive, read-only, not copyable): they can leave the token only
//     wrapped under a key the security officer marked CKA_TRUSTED. That
//     is a defence only on a token that enforces CKA_WRAP_WITH_TRUSTED and
//     lets only the SO set CKA_TRUSTED (Mechanisms.EnforcesWrapWithTrusted:
//     SoftHSM2); anywhere else they are refused (ReplicationRefusal).
//   - The receiving member makes the replication-import key, an RSA-3072
//     key pair of session objects: the private half unwraps, under
//     TransportUnwrapTemplate, only a transport key that can only unwrap
//     and is itself a session object.
//   - On the source the SO imports that public key as a trusted session
//     object and makes a trusted AES-256 transport key (a session
//     object, wrapped with RSA-OAEP to the public key); the user wraps
//     each replicated object under the transport key (RFC 5649).
//   - On the receiver the transport key is unwrapped, and each object
//     under it with the source's template; the KEK by the SO, trusted,
//     then copied by the user into a private, read-only token object as
//     GenerateKEK does. Every attribute of each replica is compared with
//     the source's; equality of the keys is proved in the tokens (a
//     throwaway key wrapped under both KEKs gives the same bytes, and a
//     throwaway card per issuer key imported on both the same blob,
//     whenever the KEK is copied too: Replication.Profiles).
//   - Every transport object is destroyed at the end, also on failure; a
//     side whose objects could not be destroyed has its session closed,
//     so that they die with it, and Replicate fails. No object made for
//     the transport is ever a token object, so none is visible to
//     another process at any time.

// ErrReplicationRefused marks a token on which replicable keys and
// replication are refused.
var ErrReplicationRefused = errors.New("replicable keys are refused on this token")

// ReplicationRefusal says why keys may not be made replicable on t, or
// nil where they may: only on a token whose table says it enforces
// CKA_WRAP_WITH_TRUSTED (measured by `issuer probe`, with the SO alone
// able to set CKA_TRUSTED: the PIN holder's path
// blob-wrap-under-own-trusted-key).
func (t *Token) ReplicationRefusal() error {
	if t.mech != nil && t.mech.EnforcesWrapWithTrusted {
		return nil
	}
	name := "?"
	if t.mech != nil {
		name = t.mech.Name
	}
	return fmt.Errorf("%w: token %q (table %s) does not enforce CKA_WRAP_WITH_TRUSTED (issuer probe: a key with it is wrapped under an untrusted key), "+
		"so an extractable issuer key or KEK would leave it under any key a holder of the user PIN makes; keep the keys non-extractable there "+
		"(members of a group on such tokens need the vendor's own cloning)", ErrReplicationRefused, t.info.Label, name)
}

// replicableAttrs is a key template made replicable: CKA_EXTRACTABLE
// true and CKA_WRAP_WITH_TRUSTED true, everything else as it was.
func replicableAttrs(t []*pkcs11.Attribute) []*pkcs11.Attribute {
	out := make([]*pkcs11.Attribute, 0, len(t)+1)
	for _, a := range t {
		switch a.Type {
		case pkcs11.CKA_EXTRACTABLE:
			out = append(out, attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true))
		case pkcs11.CKA_WRAP_WITH_TRUSTED:
		default:
			out = append(out, a)
		}
	}
	return out
}

// flagAttr reads a CK_BBOOL attribute; false if unreadable.
func flagAttr(s Session, h pkcs11.ObjectHandle, typ uint) bool {
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
	return err == nil && len(a[0].Value) == 1 && a[0].Value[0] != 0
}

// GenerateReplicableIssuerKey is GenerateIssuerKey for a key to be
// copied to other members: the private key is extractable, only under
// CKA_TRUSTED keys (CKA_WRAP_WITH_TRUSTED true), and otherwise exactly
// as GenerateIssuerKey makes it. Refused, before anything is made, on a
// token that does not enforce CKA_WRAP_WITH_TRUSTED.
func (t *Token) GenerateReplicableIssuerKey(ctx context.Context, kind, label string) (*IssuerKeyRef, error) {
	if err := t.ReplicationRefusal(); err != nil {
		return nil, fmt.Errorf("generate issuer key %q: %w", label, err)
	}
	return t.generateIssuerKey(ctx, kind, label, true)
}

// GenerateReplicableKEK is GenerateKEK for a KEK to be copied to other
// members: extractable only under CKA_TRUSTED keys, trusted by the SO.
// Refused on a token that does not enforce CKA_WRAP_WITH_TRUSTED.
func (t *Token) GenerateReplicableKEK(ctx context.Context, label, soPIN string) (*KEKRef, error) {
	if err := t.ReplicationRefusal(); err != nil {
		return nil, fmt.Errorf("generate KEK %q: %w", label, err)
	}
	return t.generateKEK(ctx, label, soPIN, true)
}

// ReplicationImportKind is the replication-import key's type.
const ReplicationImportKind = KindRSA3072

// TransportUnwrapTemplate is the replication-import key's
// CKA_UNWRAP_TEMPLATE: what it unwraps is a transport key that can only
// unwrap — sensitive, never extractable, no encrypt or decrypt (which
// would open an RFC 5649 blob block by block), no wrap, sign, verify or
// derive — and that is a public session object: never stored in the
// token (CKA_TOKEN false), usable by the SO for the trusted KEK
// (CKA_PRIVATE false), read-only.
var TransportUnwrapTemplate = map[uint]bool{
	pkcs11.CKA_TOKEN: false, pkcs11.CKA_PRIVATE: false,
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: false, pkcs11.CKA_UNWRAP: true,
	pkcs11.CKA_WRAP: false, pkcs11.CKA_ENCRYPT: false, pkcs11.CKA_DECRYPT: false,
	pkcs11.CKA_SIGN: false, pkcs11.CKA_VERIFY: false, pkcs11.CKA_DERIVE: false,
	pkcs11.CKA_COPYABLE: false, pkcs11.CKA_MODIFIABLE: false,
}

// ReplicaUnwrapTemplate is the receiving transport key's
// CKA_UNWRAP_TEMPLATE: every key unwrapped under it is sensitive,
// replicable as the sources are (extractable only under trusted keys),
// and can neither decrypt nor sign. (What differs between an issuer key
// and the KEK is stated by the replication's own templates; a token
// cannot force a CKA_UNWRAP_TEMPLATE inside another: SoftHSM2 2.6.1
// refuses nested templates, CKR_ATTRIBUTE_VALUE_INVALID.)
var ReplicaUnwrapTemplate = map[uint]bool{
	pkcs11.CKA_SENSITIVE: true, pkcs11.CKA_EXTRACTABLE: true, pkcs11.CKA_WRAP_WITH_TRUSTED: true,
	pkcs11.CKA_DECRYPT: false, pkcs11.CKA_SIGN: false,
}

// TransportWrapTemplate is the CKA_WRAP_TEMPLATE of the replication-import
// public key as the source's SO imports it, trusted: it wraps a key only
// if that key cannot unwrap — the transport key, not the KEK (which
// would go straight to the key pair's holder).
var TransportWrapTemplate = map[uint]bool{pkcs11.CKA_UNWRAP: false}

// Replication is one copy of keys from Source to Target.
type Replication struct {
	Source, Target *Token
	// SourceSOPIN and TargetSOPIN are the two security officers' PINs:
	// the source's imports the replication-import key trusted and makes
	// the transport key; the target's makes the KEK's replica trusted.
	SourceSOPIN, TargetSOPIN string
	// Keys are issuer keys on Source, each replicable; KEK, if not nil,
	// a replicable KEK on Source.
	Keys []*IssuerKeyRef
	KEK  *KEKRef
	// Profiles names, by issuer key label, the profile of the throwaway
	// card that proves the two private keys equal (an import on both
	// gives the same blob, wrapped under KEK and its replica). A key
	// without one gets the profile of its kind (Replication.ProofProfile). The public
	// halves are not proof of anything: the replica's public object is
	// made from the source's bytes. Without KEK there is no card proof
	// (no KEK on both tokens to wrap the card's key under): an RSA key's
	// private half is then shown equal only by the modulus read from its
	// private object, an EC key's not at all.
	Profiles map[string]protocol.Profile
	// Capture, if set, is given the transport as it crossed the host
	// (for the PIN-holder adversary, who may have captured it, and for
	// tests), when Replicate ends, success or failure: after every
	// transport object was destroyed, so its handles are void.
	Capture func(*Transport)
}

// Transport is what of a replication crossed the host: the
// replication-import public key, the transport key wrapped to it, each
// object wrapped under the transport key, and the session objects made
// for it (all destroyed, or dead with their closed session, when
// Replicate returns).
type Transport struct {
	ImportKeySPKI []byte
	// WrappedTransport is the transport key, RSA-OAEP (KeyImportOAEP) to
	// the replication-import key.
	WrappedTransport []byte
	// Wrapped is each replicated private object under the transport key
	// (RFC 5649), by label.
	Wrapped map[string][]byte
	// Labels of the session objects made on each side; Handles their
	// handles there (void after Replicate).
	SourceLabels, TargetLabels   []string
	SourceHandles, TargetHandles []pkcs11.ObjectHandle
}

// ReplicatedObject is one object as it is on both tokens.
type ReplicatedObject struct {
	Label string `json:"label"`
	What  string `json:"what"` // "issuer key (private)", "issuer key (public)", "KEK"
	// Attributes are the attributes compared, equal on both tokens (name
	// → value; "—" where the token gives none).
	Attributes map[string]string `json:"attributes"`
	// History are the attributes that say how an object came to be and
	// differ by nature on a replica (unwrapped, not generated): name →
	// [source, replica].
	History map[string][2]string `json:"history"`
}

// Proof is one in-token equality check.
type Proof struct {
	What   string `json:"what"`
	Method string `json:"method"`
	Source string `json:"source"` // hex of what the source gave
	Target string `json:"target"`
	Equal  bool   `json:"equal"`
}

// ReplicationResult is what Replicate did.
type ReplicationResult struct {
	// ImportKeyFingerprint is SHA-256 of the replication-import key's
	// DER SPKI.
	ImportKeyFingerprint [32]byte
	Objects              []ReplicatedObject
	Proofs               []Proof
	// Keys and KEK are the replicas on Target.
	Keys []*IssuerKeyRef
	KEK  *KEKRef
}

// CheckReplication refuses, before anything is made, a replication that
// cannot be done safely: a token that does not enforce
// CKA_WRAP_WITH_TRUSTED, a missing SO PIN, the same token twice, nothing
// to copy, a key that is not replicable, a label already on Target, a
// trusted key on either token that could carry the replicable keys out
// (UnsafeTrustedWrappers).
func CheckReplication(ctx context.Context, r Replication) error {
	if r.Source == nil || r.Target == nil {
		return errors.New("replication: source and target are required")
	}
	if len(r.Keys) == 0 && r.KEK == nil {
		return errors.New("replication: nothing to copy: name the issuer keys and/or the KEK")
	}
	if sameToken(r.Source, r.Target) {
		return fmt.Errorf("replication: source and target are the same token %q (serial %s)", r.Source.info.Label, r.Source.info.Serial)
	}
	for _, t := range []*Token{r.Source, r.Target} {
		if err := t.ReplicationRefusal(); err != nil {
			return err
		}
	}
	if r.SourceSOPIN == "" {
		return fmt.Errorf("replication: the security officer of the source token %q must make the transport key trusted: give its SO PIN", r.Source.info.Label)
	}
	if r.TargetSOPIN == "" && r.KEK != nil {
		return fmt.Errorf("replication: the security officer of the target token %q must make the KEK's replica trusted: give its SO PIN", r.Target.info.Label)
	}
	for _, k := range r.Keys {
		if !k.Replicable {
			return fmt.Errorf("replication: issuer key %q on token %q is not replicable (CKA_EXTRACTABLE false): it cannot leave its token; a key is made replicable when it is generated (ceremony: replicable: true)", k.Label, r.Source.info.Label)
		}
	}
	if r.KEK != nil && (!r.KEK.Replicable || !r.KEK.Trusted) {
		return fmt.Errorf("replication: KEK %q on token %q is not a replicable trusted KEK (a KEK is made replicable when it is generated)", r.KEK.Label, r.Source.info.Label)
	}
	for _, l := range replicationLabels(r) {
		used, err := r.Target.LabelInUse(ctx, l)
		if err != nil {
			return err
		}
		if used {
			return fmt.Errorf("replication: label %q already exists in the target token %q (a replica needs the source's label; nothing was created)", l, r.Target.info.Label)
		}
	}
	for _, t := range []*Token{r.Source, r.Target} {
		fs, err := t.UnsafeTrustedWrappers(ctx)
		if err != nil {
			return err
		}
		if len(fs) > 0 {
			return fmt.Errorf("replication: token %q holds a trusted key that could carry the replicable keys out: %s", t.info.Label, fs[0])
		}
	}
	return nil
}

func replicationLabels(r Replication) []string {
	var l []string
	for _, k := range r.Keys {
		l = append(l, k.Label)
	}
	if r.KEK != nil {
		l = append(l, r.KEK.Label)
	}
	return l
}

func sameToken(a, b *Token) bool {
	return a == b || a.mod == b.mod && a.info.Serial == b.info.Serial && a.info.Label == b.info.Label
}

// UnsafeTrustedWrappers lists the trusted keys of t that can wrap and
// would carry a replicable key out of the token: every CKA_TRUSTED key
// with CKA_WRAP true that has no CKA_WRAP_TEMPLATE and is not a KEK of
// this version (whose CKA_UNWRAP_TEMPLATE brings every key wrapped under
// it back without a usage: KEKUnwrapTemplate). A KTK imported before it
// got KTKWrapTemplate is one (its receiver would open what it wraps); so
// is a KEK made before KEK rotation existed (a key wrapped under it comes
// back decrypting) and a trusted public key. An attribute it cannot read
// is an error, never a pass. The keys' values are never read.
func (t *Token) UnsafeTrustedWrappers(ctx context.Context) ([]Finding, error) {
	if !t.mech.EnforcesWrapWithTrusted {
		return nil, nil // NSS: CKA_TRUSTED unknown; replication refused anyway
	}
	var out []Finding
	err := t.With(ctx, func(s Session) error {
		out = out[:0]
		hs, err := findAll(s, []*pkcs11.Attribute{attr(pkcs11.CKA_TRUSTED, true)})
		if err != nil {
			return err
		}
		for _, h := range hs {
			// A trusted certificate has no CKA_WRAP and wraps nothing; any
			// other trusted object is judged by what it says.
			a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_CLASS, nil)})
			if err != nil {
				return fmt.Errorf("a trusted object (handle %d): read CKA_CLASS: %w", h, Call("C_GetAttributeValue", nil, err))
			}
			if class, err := ckULong(a[0].Value); err == nil && class == pkcs11.CKO_CERTIFICATE {
				continue
			}
			wraps, err := boolAttr(s, h, pkcs11.CKA_WRAP)
			if err != nil {
				return fmt.Errorf("a trusted key (handle %d): read %s: %w", h, AttrName(pkcs11.CKA_WRAP), err)
			}
			if !wraps {
				continue
			}
			wt, err := readArrayAttribute(s, h, pkcs11.CKA_WRAP_TEMPLATE)
			if err != nil {
				return err
			}
			if len(wt) > 0 {
				continue
			}
			unwraps, err := boolAttr(s, h, pkcs11.CKA_UNWRAP)
			if err != nil {
				return fmt.Errorf("a trusted key (handle %d): read %s: %w", h, AttrName(pkcs11.CKA_UNWRAP), err)
			}
			if unwraps {
				ut, err := readArrayAttribute(s, h, pkcs11.CKA_UNWRAP_TEMPLATE)
				if err != nil {
					return err
				}
				if coversPolicy(ut, KEKUnwrapTemplate) {
					continue
				}
			}
			label := ""
			if a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, nil)}); err == nil {
				label = string(a[0].Value)
			}
			out = append(out, Finding{Key: fmt.Sprintf("trusted key %q", label), Label: label, Attribute: "CKA_WRAP_TEMPLATE",
				Have: "none", Want: "a wrap template (KTKWrapTemplate) or a KEK's CKA_UNWRAP_TEMPLATE (KEKUnwrapTemplate)",
				Fix: fixTrustedWrapper})
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list the trusted wrapping keys of token %q: %w", t.info.Label, err)
	}
	return out, nil
}

const fixTrustedWrapper = "it can wrap a replicable issuer key or KEK to whoever holds it or can unwrap under it: destroy it (a KTK: import it again with this version, which gives it a CKA_WRAP_TEMPLATE; a KEK: rotate to a KEK of this version), or keep the keys non-replicable"

// coversPolicy reports whether a read template holds every attribute of
// policy with its value.
func coversPolicy(have map[uint][]byte, policy map[uint]bool) bool {
	for typ, v := range policy {
		b, ok := have[typ]
		if !ok || len(b) != 1 || (b[0] != 0) != v {
			return false
		}
	}
	return true
}

// exclusivePair runs fn on one session of each of two tokens while no
// other work runs on either (both may log their SO in).
func exclusivePair(ctx context.Context, a, b *Token, fn func(pa, pb *pooled) error) error {
	first, second := a, b
	if tokenKey(b) < tokenKey(a) {
		first, second = b, a
	}
	first.excl.Lock()
	defer first.excl.Unlock()
	second.excl.Lock()
	defer second.excl.Unlock()
	if a.closed || b.closed {
		return ErrClosed
	}
	pa, err := a.pool.take(ctx)
	if err != nil {
		return err
	}
	defer a.pool.give(pa)
	pb, err := b.pool.take(ctx)
	if err != nil {
		return err
	}
	defer b.pool.give(pb)
	ua := useOf(a.mod)
	ua.RLock()
	defer ua.RUnlock()
	if b.mod != a.mod {
		ub := useOf(b.mod)
		ub.RLock()
		defer ub.RUnlock()
	}
	if err := a.ready(pa); err != nil {
		return wrapToken(a.info.Label, err)
	}
	if err := b.ready(pb); err != nil {
		return wrapToken(b.info.Label, err)
	}
	return fn(pa, pb)
}

func tokenKey(t *Token) string { return t.mod.path + "\x00" + t.info.Serial + "\x00" + t.info.Label }

// Replicate copies r.Keys and r.KEK from r.Source to r.Target inside the
// tokens (see the top of this file), compares every attribute of each
// replica with its source and proves the keys equal in the tokens (each
// issuer key also by a throwaway card, of Replication.ProofProfile,
// when a KEK is copied with it). On any failure every replica made is
// destroyed (the error says so, or names what could not be). Every
// transport object on both sides is destroyed whatever happened; where
// one could not be, the session it lives in is closed (it dies with it)
// and Replicate fails. CheckReplication runs first.
func Replicate(ctx context.Context, r Replication) (*ReplicationResult, error) {
	if err := CheckReplication(ctx, r); err != nil {
		return nil, err
	}
	res := &ReplicationResult{}
	err := exclusivePair(ctx, r.Source, r.Target, func(ps, pt *pooled) error {
		x := &replication{r: r, ps: ps, pt: pt, res: res, tr: &Transport{Wrapped: map[string][]byte{}}}
		err := x.run()
		if err != nil && len(x.replicas) > 0 {
			if derr := x.destroyReplicas(); derr != nil {
				err = errors.Join(err, derr)
			} else {
				err = fmt.Errorf("%w (the replicas made were destroyed)", err)
			}
		}
		if terr := x.endTransport(); terr != nil {
			err = errors.Join(err, terr)
		}
		// Only now: every transport handle in x.tr is void.
		if r.Capture != nil {
			r.Capture(x.tr)
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("replicate from token %q to token %q: %w", r.Source.info.Label, r.Target.info.Label, err)
	}
	return res, nil
}

// replication is one run of Replicate.
type replication struct {
	r      Replication
	ps, pt *pooled
	res    *ReplicationResult
	tr     *Transport
	// Session objects: on the target the replication-import key pair and
	// the transport key, on the source the trusted public key and the
	// transport key.
	rkiPub, rkiPriv, tTarget pkcs11.ObjectHandle
	trustedPub, tSource      pkcs11.ObjectHandle
	// replicas made on the target, found again by their templates.
	replicas []replica
	// sources, by label, and what was read of them.
	srcAttrs map[string]objAttrs
}

// replica is one object made on the target: what and label name it in
// errors, find finds it again.
type replica struct {
	what, label string
	find        []*pkcs11.Attribute
}

func (x *replication) src() Session { return x.r.Source.session(x.ps) }
func (x *replication) dst() Session { return x.r.Target.session(x.pt) }

// newLabel is a label for a transport session object.
func newLabel(what string) string {
	b := make([]byte, 6)
	rand.Read(b)
	return "blindperso-replication-" + hex.EncodeToString(b) + "-" + what
}

func (x *replication) run() error {
	if err := x.makeImportKey(); err != nil {
		return fmt.Errorf("the target makes the replication-import key: %w", err)
	}
	if err := x.makeTransport(); err != nil {
		return fmt.Errorf("the source's security officer makes the transport key: %w", err)
	}
	if err := x.wrapObjects(); err != nil {
		return fmt.Errorf("the source wraps the keys under the transport key: %w", err)
	}
	if err := x.receiveTransport(); err != nil {
		return fmt.Errorf("the target unwraps the transport key: %w", err)
	}
	// The KEK first: the SO's login on the target drops the handles of
	// private objects, and the issuer keys' replicas are found again
	// afterwards anyway.
	if x.r.KEK != nil {
		if err := x.receiveKEK(); err != nil {
			return fmt.Errorf("the target's security officer unwraps the KEK: %w", err)
		}
	}
	for _, k := range x.r.Keys {
		if err := x.receiveKey(k); err != nil {
			return fmt.Errorf("the target unwraps issuer key %q: %w", k.Label, err)
		}
	}
	if err := x.destroyTransport(); err != nil {
		return err
	}
	if err := x.compare(); err != nil {
		return err
	}
	return x.prove()
}

// makeImportKey: the target's user generates the replication-import key
// pair as session objects and exports the public key.
func (x *replication) makeImportKey() error {
	s := x.dst()
	var ts templates
	defer ts.free()
	label := newLabel("import")
	id := newID()
	mech, pubT, privT, err := issuerKeyTemplates(ReplicationImportKind, label, id, s.M, &ts)
	if err != nil {
		return err
	}
	ut, err := ts.add(pkcs11.CKA_UNWRAP_TEMPLATE, TransportUnwrapTemplate)
	if err != nil {
		return err
	}
	session := func(t []*pkcs11.Attribute) {
		for i, a := range t {
			switch a.Type {
			case pkcs11.CKA_TOKEN:
				t[i] = attr(pkcs11.CKA_TOKEN, false)
			case pkcs11.CKA_UNWRAP_TEMPLATE:
				t[i] = ut
			}
		}
	}
	session(pubT)
	session(privT)
	m := pkcs11.NewMechanism(mech, nil)
	x.tr.TargetLabels = append(x.tr.TargetLabels, label)
	x.rkiPub, x.rkiPriv, err = s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m}, pubT, privT)
	if err != nil {
		return Call("C_GenerateKeyPair", m, err)
	}
	x.tr.TargetHandles = append(x.tr.TargetHandles, x.rkiPub, x.rkiPriv)
	pk, err := exportPublic(s, x.rkiPub)
	if err != nil {
		return err
	}
	x.tr.ImportKeySPKI = pk.SPKI
	x.res.ImportKeyFingerprint = sha256.Sum256(pk.SPKI)
	return nil
}

// makeTransport: the source's SO imports the replication-import public
// key as a trusted public session object (it can wrap only a key that
// cannot unwrap), generates the trusted transport key (AES-256, a
// public session object, sensitive, extractable only under a trusted
// key, wrap only) and wraps it to the public key with RSA-OAEP.
func (x *replication) makeTransport() error {
	pk, err := protocol.ParseIssuerKey(x.tr.ImportKeySPKI)
	if err != nil {
		return fmt.Errorf("the replication-import public key: %w", err)
	}
	if pk.RSA == nil {
		return errors.New("the replication-import public key is not an RSA key")
	}
	wt, err := newCKATemplate(pkcs11.CKA_WRAP_TEMPLATE, TransportWrapTemplate)
	if err != nil {
		return err
	}
	defer wt.free()
	pubLabel, tLabel := newLabel("import-trusted"), newLabel("transport")
	x.tr.SourceLabels = append(x.tr.SourceLabels, pubLabel, tLabel)
	pubT := append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_PUBLIC_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_RSA),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false), attr(pkcs11.CKA_LABEL, pubLabel),
		attr(pkcs11.CKA_MODULUS, pk.RSA.N.Bytes()), attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(pk.RSA.E)).Bytes()),
		attr(pkcs11.CKA_TRUSTED, true), wt.attr,
	}, usages(publicUsages, pkcs11.CKA_WRAP)...)
	pubT = append(pubT, locked(x.r.Source.mech, false)...)
	tT := append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_VALUE_LEN, 32), attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false),
		attr(pkcs11.CKA_LABEL, tLabel),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
		attr(pkcs11.CKA_TRUSTED, true),
	}, usages(secretUsages, pkcs11.CKA_WRAP)...)
	tT = append(tT, locked(x.r.Source.mech, false)...)
	return x.r.Source.asSO(x.ps, x.r.SourceSOPIN, func(s Session) error {
		var err error
		x.trustedPub, err = s.P.CreateObject(s.H, pubT)
		if err != nil {
			return fmt.Errorf("import the replication-import public key trusted: %w", Call("C_CreateObject", nil, err))
		}
		x.tr.SourceHandles = append(x.tr.SourceHandles, x.trustedPub)
		m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
		x.tSource, err = s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, tT)
		if err != nil {
			return Call("C_GenerateKey", m, err)
		}
		x.tr.SourceHandles = append(x.tr.SourceHandles, x.tSource)
		om := KeyImportOAEP()
		x.tr.WrappedTransport, err = s.P.WrapKey(s.H, []*pkcs11.Mechanism{om}, x.trustedPub, x.tSource)
		if err != nil {
			return fmt.Errorf("wrap the transport key to the replication-import key: %w", Call("C_WrapKey", om, err))
		}
		return nil
	})
}

// wrapObjects: the source's user wraps each object under the transport
// key (RFC 5649) and reads its attributes.
func (x *replication) wrapObjects() error {
	s := x.src()
	x.srcAttrs = map[string]objAttrs{}
	wm := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
	wrap := func(label string, h pkcs11.ObjectHandle) error {
		w, err := s.P.WrapKey(s.H, []*pkcs11.Mechanism{wm}, x.tSource, h)
		if err != nil {
			return fmt.Errorf("wrap %q: %w", label, Call("C_WrapKey", wm, err))
		}
		x.tr.Wrapped[label] = w
		return nil
	}
	for _, k := range x.r.Keys {
		priv, pub, err := k.handles(s)
		if err != nil {
			return err
		}
		if x.srcAttrs[k.Label+"/private"], err = readObject(s, priv, privateKeyAttrs); err != nil {
			return err
		}
		if x.srcAttrs[k.Label+"/public"], err = readObject(s, pub, publicKeyAttrs); err != nil {
			return err
		}
		if err := wrap(k.Label, priv); err != nil {
			return err
		}
	}
	if k := x.r.KEK; k != nil {
		h, err := k.Handle(s)
		if err != nil {
			return err
		}
		if x.srcAttrs[k.Label+"/secret"], err = readObject(s, h, secretKeyAttrs); err != nil {
			return err
		}
		if err := wrap(k.Label, h); err != nil {
			return err
		}
	}
	// Nothing more goes under the transport key.
	return x.destroySource()
}

// receiveTransport: the target's user unwraps the transport key under the
// replication-import key (which forces TransportUnwrapTemplate) into a
// public session object that can only unwrap, with ReplicaUnwrapTemplate;
// then the replication-import key pair is destroyed.
func (x *replication) receiveTransport() error {
	s := x.dst()
	ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, ReplicaUnwrapTemplate)
	if err != nil {
		return err
	}
	defer ut.free()
	label := newLabel("transport")
	x.tr.TargetLabels = append(x.tr.TargetLabels, label)
	t := append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, false), attr(pkcs11.CKA_LABEL, label),
		attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false), ut.attr,
	}, usages(secretUsages, pkcs11.CKA_UNWRAP)...)
	t = forUnwrap(append(t, locked(s.M, false)...))
	om := KeyImportOAEP()
	x.tTarget, err = s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{om}, x.rkiPriv, x.tr.WrappedTransport, t)
	if err != nil {
		return Call("C_UnwrapKey", om, err)
	}
	x.tr.TargetHandles = append(x.tr.TargetHandles, x.tTarget)
	return destroyAll(s, x.targetObjects()[1:]) // the replication-import key: its work is done
}

// forUnwrap reorders a generation template for C_UnwrapKey: CKA_COPYABLE
// and CKA_MODIFIABLE last, in that order, because SoftHSM2 applies the
// template in order and refuses every attribute after CKA_MODIFIABLE
// false (CKR_ATTRIBUTE_READ_ONLY; see rewrapTemplate); and without the
// attributes a token computes on unwrap (CKA_VALUE_LEN; SoftHSM2 refuses
// it).
func forUnwrap(t []*pkcs11.Attribute) []*pkcs11.Attribute {
	var out, tail []*pkcs11.Attribute
	var mod *pkcs11.Attribute
	for _, a := range t {
		switch a.Type {
		case pkcs11.CKA_VALUE_LEN:
		case pkcs11.CKA_COPYABLE:
			tail = append(tail, a)
		case pkcs11.CKA_MODIFIABLE:
			mod = a
		default:
			out = append(out, a)
		}
	}
	out = append(out, tail...)
	if mod != nil {
		out = append(out, mod)
	}
	return out
}

// receiveKEK: the target's SO unwraps the KEK under the transport key as
// a public, trusted session object with the source's template, the user
// copies it into a private, read-only token object, and the session
// original is destroyed: GenerateKEK's sequence, with C_UnwrapKey for
// C_GenerateKey.
func (x *replication) receiveKEK() error {
	k := x.r.KEK
	ut, err := newCKATemplate(pkcs11.CKA_UNWRAP_TEMPLATE, KEKUnwrapTemplate)
	if err != nil {
		return err
	}
	defer ut.free()
	tmpl := forUnwrap(replicableAttrs(append(kekAttrs(k.Label, k.ID, false, false, ut.attr), attr(pkcs11.CKA_TRUSTED, true))))
	wm := pkcs11.NewMechanism(x.r.Target.mech.KeyWrapRFC5649, nil)
	h, err := x.r.Target.trustedToPrivate(x.pt, x.r.TargetSOPIN, func(s Session) (pkcs11.ObjectHandle, error) {
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{wm}, x.tTarget, x.tr.Wrapped[k.Label], tmpl)
		return h, Call("C_UnwrapKey", wm, err)
	})
	if err != nil {
		return err
	}
	x.replicas = append(x.replicas, replica{"KEK", k.Label, kekFind(k.Label, k.ID)})
	ref := &KEKRef{Label: k.Label, ID: k.ID, Trusted: true, Replicable: true, tok: x.r.Target}
	ref.obj.find = kekFind(k.Label, k.ID)
	ref.obj.set(x.r.Target, h)
	x.res.KEK = ref
	return nil
}

// receiveKey: the target's user unwraps the issuer key's private half
// under the transport key with the source's generation template (and
// the same label and CKA_ID), and creates its public half from the
// source's public key with the source's public template.
func (x *replication) receiveKey(k *IssuerKeyRef) error {
	s := x.dst()
	var ts templates
	defer ts.free()
	_, pubT, privT, err := issuerKeyTemplates(k.Kind, k.Label, k.ID, s.M, &ts)
	if err != nil {
		return err
	}
	privT = forUnwrap(replicableAttrs(privT))
	wm := pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil)
	priv, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{wm}, x.tTarget, x.tr.Wrapped[k.Label], privT)
	if err != nil {
		return Call("C_UnwrapKey", wm, err)
	}
	x.replicas = append(x.replicas, replica{"issuer key (private)", k.Label, privateKeyFind(k.Label, k.ID)})
	// The public object: the source's template without what generation
	// alone takes (CKA_MODULUS_BITS), with the public key's values.
	var pt []*pkcs11.Attribute
	for _, a := range pubT {
		switch a.Type {
		case pkcs11.CKA_MODULUS_BITS, pkcs11.CKA_PUBLIC_EXPONENT:
		default:
			pt = append(pt, a)
		}
	}
	src := x.srcAttrs[k.Label+"/public"]
	switch {
	case k.Public.RSA != nil:
		pt = append(pt, attr(pkcs11.CKA_MODULUS, src.raw[pkcs11.CKA_MODULUS]), attr(pkcs11.CKA_PUBLIC_EXPONENT, src.raw[pkcs11.CKA_PUBLIC_EXPONENT]))
	default:
		pt = append(pt, attr(pkcs11.CKA_EC_POINT, src.raw[pkcs11.CKA_EC_POINT]))
	}
	pub, err := s.P.CreateObject(s.H, pt)
	if err != nil {
		return fmt.Errorf("create the public key: %w", Call("C_CreateObject", nil, err))
	}
	x.replicas = append(x.replicas, replica{"issuer key (public)", k.Label, publicKeyFind(k.ID)})
	pk, err := exportPublic(s, pub)
	if err != nil {
		return err
	}
	ref := &IssuerKeyRef{Label: k.Label, ID: k.ID, Kind: k.Kind, Public: pk, Replicable: true, tok: x.r.Target}
	ref.priv.find = privateKeyFind(k.Label, k.ID)
	ref.priv.set(x.r.Target, priv)
	x.res.Keys = append(x.res.Keys, ref)
	return nil
}

// destroy destroys the object *h (if there is one) and clears *h only
// once it is destroyed, so that a later pass tries again.
func destroy(s Session, h *pkcs11.ObjectHandle, what string) error {
	if *h == 0 {
		return nil
	}
	if err := s.P.DestroyObject(s.H, *h); err != nil {
		return fmt.Errorf("destroy %s: %w", what, Call("C_DestroyObject", nil, err))
	}
	*h = 0
	return nil
}

// transportObject is one transport object of a side, by what it is.
type transportObject struct {
	h    *pkcs11.ObjectHandle
	what string
}

func (x *replication) sourceObjects() []transportObject {
	return []transportObject{{&x.tSource, "the source's transport key"}, {&x.trustedPub, "the source's trusted replication-import public key"}}
}

func (x *replication) targetObjects() []transportObject {
	return []transportObject{{&x.tTarget, "the target's transport key"},
		{&x.rkiPriv, "the replication-import key (private)"}, {&x.rkiPub, "the replication-import key (public)"}}
}

func destroyAll(s Session, objs []transportObject) error {
	var errs []error
	for _, o := range objs {
		errs = append(errs, destroy(s, o.h, o.what))
	}
	return errors.Join(errs...)
}

// destroySource destroys the source's transport objects still there.
func (x *replication) destroySource() error { return destroyAll(x.src(), x.sourceObjects()) }

// destroyTransport destroys every transport object still there, on both
// sides.
func (x *replication) destroyTransport() error {
	return errors.Join(x.destroySource(), destroyAll(x.dst(), x.targetObjects()))
}

// endTransport is the last pass of destroyTransport, when Replicate
// ends: a side whose transport objects still cannot be destroyed has its
// session closed, so that they die with it (they are session objects of
// that session), and the session goes back to the pool not ok (its next
// user opens a new one), never as usable with them alive.
func (x *replication) endTransport() error {
	var errs []error
	for _, side := range []struct {
		name string
		tok  *Token
		ps   *pooled
		objs []transportObject
	}{
		{"source", x.r.Source, x.ps, x.sourceObjects()},
		{"target", x.r.Target, x.pt, x.targetObjects()},
	} {
		err := destroyAll(side.tok.session(side.ps), side.objs)
		if err == nil {
			continue
		}
		errs = append(errs, err)
		cerr := side.tok.mod.ctx.CloseSession(side.ps.h)
		side.ps.ok = false
		side.tok.epoch.Add(1) // the close may have logged the user out: handles found before are stale
		if cerr != nil {
			errs = append(errs, fmt.Errorf("close the %s's session, in which a transport object is left: %w", side.name, Call("C_CloseSession", nil, cerr)))
			continue
		}
		for _, o := range side.objs {
			*o.h = 0 // died with the session
		}
		errs = append(errs, fmt.Errorf("the %s's session was closed, and its transport objects with it", side.name))
	}
	return errors.Join(errs...)
}

// destroyReplicas destroys every replica made on the target. A replica
// it cannot find (or finds and cannot destroy) is named in the error: it
// was made, so not finding it is not proof that it is gone.
func (x *replication) destroyReplicas() error {
	s := x.dst()
	var left []string
	var errs []error
	for _, r := range x.replicas {
		hs, err := findAll(s, r.find)
		if err == nil && len(hs) == 0 {
			err = errors.New("not found")
		}
		for _, h := range hs {
			if derr := s.P.DestroyObject(s.H, h); derr != nil && err == nil {
				err = Call("C_DestroyObject", nil, derr)
			}
		}
		if err != nil {
			left = append(left, fmt.Sprintf("%s %q", r.what, r.label))
			errs = append(errs, fmt.Errorf("%s %q: %w", r.what, r.label, err))
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("the replicas could not all be destroyed: %s may be left on token %q (destroy them by label): %w",
			strings.Join(left, ", "), x.r.Target.info.Label, errors.Join(errs...))
	}
	return nil
}

// compare reads every replica's attributes and compares them with its
// source's, attribute by attribute.
func (x *replication) compare() error {
	s := x.dst()
	check := func(label, key, what string, h pkcs11.ObjectHandle, names []uint) error {
		got, err := readObject(s, h, names)
		if err != nil {
			return err
		}
		want := x.srcAttrs[key]
		var diff []string
		for _, n := range names {
			name := AttrName(n)
			if want.shown[name] != got.shown[name] {
				diff = append(diff, fmt.Sprintf("%s is %s, the source's %s", name, got.shown[name], want.shown[name]))
			}
		}
		if len(diff) > 0 {
			return fmt.Errorf("the replica of %s %q differs from its source: %s", what, label, strings.Join(diff, "; "))
		}
		hist := map[string][2]string{}
		for _, n := range historyAttrs {
			name := AttrName(n)
			hist[name] = [2]string{want.history[name], got.history[name]}
		}
		x.res.Objects = append(x.res.Objects, ReplicatedObject{Label: label, What: what, Attributes: got.shown, History: hist})
		return nil
	}
	for _, k := range x.res.Keys {
		priv, pub, err := k.handles(s)
		if err != nil {
			return err
		}
		if err := check(k.Label, k.Label+"/private", "issuer key (private)", priv, privateKeyAttrs); err != nil {
			return err
		}
		if err := check(k.Label, k.Label+"/public", "issuer key (public)", pub, publicKeyAttrs); err != nil {
			return err
		}
	}
	if k := x.res.KEK; k != nil {
		h, err := k.Handle(s)
		if err != nil {
			return err
		}
		if err := check(k.Label, k.Label+"/secret", "KEK", h, secretKeyAttrs); err != nil {
			return err
		}
	}
	return nil
}

// ProofProfile is the profile of the throwaway card that proves a
// replica of k equal to k: r.Profiles' if it names one, else the AES-KDF
// profile of k's kind (rsa-oaep-aes for an RSA key, ecdh-p256-aes for a
// P-256 key), which every token replication runs on (SoftHSM2) runs.
func (r Replication) ProofProfile(k *IssuerKeyRef) protocol.Profile {
	if p, ok := r.Profiles[k.Label]; ok {
		return p
	}
	if k.Public != nil && k.Public.EC != nil {
		return protocol.ECDHP256AES
	}
	return protocol.RSAOAEPAES
}

// prove shows in the tokens that each replica is its source's key: the
// public objects (made on the target from the source's bytes, so a check
// of that copy, not of the private half), an RSA key's modulus read from
// each private object, the KEKs by a throwaway key, and, with a KEK,
// each issuer key by a throwaway card (ProofProfile) imported on both.
func (x *replication) prove() error {
	ss, st := x.src(), x.dst()
	for i, k := range x.r.Keys {
		rk := x.res.Keys[i]
		sfp, tfp := k.Fingerprint(), rk.Fingerprint()
		x.res.Proofs = append(x.res.Proofs, Proof{What: "issuer key " + k.Label, Method: "SHA-256 of the public key's DER SPKI, read from each token's public object (the replica's is made from the source's values: this checks that copy, not the private key)",
			Source: hex.EncodeToString(sfp[:]), Target: hex.EncodeToString(tfp[:]), Equal: sfp == tfp})
		if k.Public.RSA != nil {
			a, b := x.srcAttrs[k.Label+"/private"].raw[pkcs11.CKA_MODULUS], x.rawOf(st, rk, pkcs11.CKA_MODULUS)
			x.res.Proofs = append(x.res.Proofs, Proof{What: "issuer key " + k.Label, Method: "SHA-256 of the private key object's CKA_MODULUS",
				Source: hashHex(a), Target: hashHex(b), Equal: len(a) > 0 && bytes.Equal(a, b)})
		}
	}
	if x.r.KEK != nil {
		kekS, err := x.r.KEK.Handle(ss)
		if err != nil {
			return err
		}
		kekT, err := x.res.KEK.Handle(st)
		if err != nil {
			return err
		}
		p, err := kekProof(ss, st, kekS, kekT)
		if err != nil {
			return err
		}
		p.What = "KEK " + x.r.KEK.Label
		x.res.Proofs = append(x.res.Proofs, p)
		for i, k := range x.r.Keys {
			p, err := cardProof(ss, st, x.r.ProofProfile(k), k, x.res.Keys[i], kekS, kekT)
			if err != nil {
				return err
			}
			p.What = fmt.Sprintf("issuer key %s and KEK %s", k.Label, x.r.KEK.Label)
			x.res.Proofs = append(x.res.Proofs, p)
		}
	}
	for _, p := range x.res.Proofs {
		if !p.Equal {
			return fmt.Errorf("the replica of %s is not its source's key (%s: %s on the source, %s on the target)", p.What, p.Method, p.Source, p.Target)
		}
	}
	return nil
}

func (x *replication) rawOf(s Session, k *IssuerKeyRef, typ uint) []byte {
	h, err := k.Handle(s)
	if err != nil {
		return nil
	}
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(typ, nil)})
	if err != nil {
		return nil
	}
	return a[0].Value
}

func hashHex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// kekProof generates a throwaway AES-128 key in the source token (a
// session object shaped as K_I: sensitive, no usage, extractable only
// under trusted keys), wraps it under the source's KEK with RFC 5649,
// and lets the target re-wrap that blob under its KEK (RewrapCardKey:
// unwrapped under the target's KEK, which RFC 5649's integrity check
// refuses for another KEK, and wrapped again). RFC 5649 is
// deterministic: equal bytes, equal KEKs. No value is known to the host.
func kekProof(ss, st Session, kekS, kekT pkcs11.ObjectHandle) (Proof, error) {
	m := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
	h, err := ss.P.GenerateKey(ss.H, []*pkcs11.Mechanism{m}, append([]*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, pkcs11.CKK_AES), attr(pkcs11.CKA_VALUE_LEN, protocol.KeySize),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, true), attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true),
	}, usages(secretUsages)...))
	if err != nil {
		return Proof{}, fmt.Errorf("KEK proof: %w", Call("C_GenerateKey", m, err))
	}
	a, err := WrapCardKey(ss, kekS, h)
	if derr := ss.P.DestroyObject(ss.H, h); err == nil && derr != nil {
		err = Call("C_DestroyObject", nil, derr)
	}
	if err != nil {
		return Proof{}, fmt.Errorf("KEK proof on the source: %w", err)
	}
	b, err := RewrapCardKey(st, kekT, kekT, a)
	if err != nil {
		return Proof{}, fmt.Errorf("KEK proof on the target (its KEK does not open the source's wrap): %w", err)
	}
	return Proof{Method: "a throwaway AES-128 key generated in the source, wrapped there under the KEK (RFC 5649, deterministic); the target unwraps it under its KEK and wraps it again",
		Source: hex.EncodeToString(a.Wrapped), Target: hex.EncodeToString(b.Wrapped), Equal: bytes.Equal(a.Wrapped, b.Wrapped)}, nil
}

// cardProof imports one throwaway card (c for the key's public key,
// made on the host) on both tokens, as the issuer imports cards: the
// same c under equal issuer keys and equal KEKs gives the same blob.
func cardProof(ss, st Session, p protocol.Profile, src, dst *IssuerKeyRef, kekS, kekT pkcs11.ObjectHandle) (Proof, error) {
	_, c, err := protocol.Encapsulate(p, src.Public, rand.Reader)
	if err != nil {
		return Proof{}, err
	}
	imp := func(s Session, k *IssuerKeyRef, kek pkcs11.ObjectHandle) ([]byte, error) {
		h, err := k.Handle(s)
		if err != nil {
			return nil, err
		}
		b, err := ImportCard(s, p, h, kek, k.Public.SPKI, c)
		return b.Wrapped, err
	}
	a, err := imp(ss, src, kekS)
	if err != nil {
		return Proof{}, fmt.Errorf("card proof on the source: %w", err)
	}
	b, err := imp(st, dst, kekT)
	if err != nil {
		return Proof{}, fmt.Errorf("card proof on the target: %w", err)
	}
	return Proof{Method: fmt.Sprintf("a throwaway card's c (profile %s) imported in each token: K_I derived and wrapped under the KEK (RFC 5649)", p.Name),
		Source: hex.EncodeToString(a), Target: hex.EncodeToString(b), Equal: bytes.Equal(a, b)}, nil
}

// The attributes compared, by class; historyAttrs are recorded only.
var (
	commonKeyAttrs  = []uint{pkcs11.CKA_CLASS, pkcs11.CKA_KEY_TYPE, pkcs11.CKA_TOKEN, pkcs11.CKA_PRIVATE, pkcs11.CKA_LABEL, pkcs11.CKA_ID, pkcs11.CKA_MODIFIABLE, pkcs11.CKA_COPYABLE}
	privateKeyAttrs = append(append([]uint{}, commonKeyAttrs...), pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_WRAP_WITH_TRUSTED,
		pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_SIGN_RECOVER, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE,
		pkcs11.CKA_UNWRAP_TEMPLATE, pkcs11.CKA_DERIVE_TEMPLATE, pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT, pkcs11.CKA_EC_PARAMS)
	publicKeyAttrs = append(append([]uint{}, commonKeyAttrs...), pkcs11.CKA_ENCRYPT, pkcs11.CKA_VERIFY, pkcs11.CKA_VERIFY_RECOVER,
		pkcs11.CKA_WRAP, pkcs11.CKA_DERIVE, pkcs11.CKA_TRUSTED, pkcs11.CKA_WRAP_TEMPLATE,
		pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT, pkcs11.CKA_EC_PARAMS, pkcs11.CKA_EC_POINT)
	secretKeyAttrs = append(append([]uint{}, commonKeyAttrs...), pkcs11.CKA_SENSITIVE, pkcs11.CKA_EXTRACTABLE, pkcs11.CKA_WRAP_WITH_TRUSTED,
		pkcs11.CKA_TRUSTED, pkcs11.CKA_ENCRYPT, pkcs11.CKA_DECRYPT, pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY,
		pkcs11.CKA_WRAP, pkcs11.CKA_UNWRAP, pkcs11.CKA_DERIVE, pkcs11.CKA_UNWRAP_TEMPLATE, pkcs11.CKA_WRAP_TEMPLATE)
	// How an object came to be: generated in the token (CKA_LOCAL true,
	// and always sensitive) or unwrapped (false). SoftHSM2 also leaves
	// CKA_VALUE_LEN 0 on an unwrapped secret key.
	historyAttrs = []uint{pkcs11.CKA_LOCAL, pkcs11.CKA_ALWAYS_SENSITIVE, pkcs11.CKA_NEVER_EXTRACTABLE, pkcs11.CKA_VALUE_LEN}
)

// objAttrs is what readObject read: every attribute shown as text, the
// raw bytes of the non-array ones, and the history attributes.
type objAttrs struct {
	shown   map[string]string
	raw     map[uint][]byte
	history map[string]string
}

// readableAttrs are the only attributes readObject reads: the lists above.
// An allowlist, so that no caller's list can bring a key's secret (its
// value, a private exponent, a CRT value) to the host.
var readableAttrs = func() map[uint]bool {
	m := map[uint]bool{}
	for _, l := range [][]uint{privateKeyAttrs, publicKeyAttrs, secretKeyAttrs, historyAttrs} {
		for _, n := range l {
			m[n] = true
		}
	}
	return m
}()

// readObject reads names and historyAttrs of h. Values are shown as the
// transcript records them: CK_BBOOL true/false, CKA_CLASS and
// CKA_KEY_TYPE by name, CKA_LABEL as text, array attributes as
// "{CKA_X=v, …}", other byte strings in hex; "—" for an attribute the
// object does not have. It refuses any attribute outside readableAttrs.
func readObject(s Session, h pkcs11.ObjectHandle, names []uint) (objAttrs, error) {
	o := objAttrs{shown: map[string]string{}, raw: map[uint][]byte{}, history: map[string]string{}}
	for _, n := range names {
		if !readableAttrs[n] {
			return o, fmt.Errorf("readObject: %s is not an attribute the comparison reads (a key's secret is never read to the host)", AttrName(n))
		}
	}
	for _, n := range names {
		v, err := showAttr(s, h, n, o.raw)
		if err != nil {
			return o, err
		}
		o.shown[AttrName(n)] = v
	}
	for _, n := range historyAttrs {
		v, err := showAttr(s, h, n, o.raw)
		if err != nil {
			return o, err
		}
		o.history[AttrName(n)] = v
	}
	return o, nil
}

func showAttr(s Session, h pkcs11.ObjectHandle, n uint, raw map[uint][]byte) (string, error) {
	if n&pkcs11.CKF_ARRAY_ATTRIBUTE != 0 {
		m, err := readArrayAttribute(s, h, n)
		if err != nil {
			return "", err
		}
		if m == nil {
			return "—", nil
		}
		return showTemplate(m), nil
	}
	a, err := s.P.GetAttributeValue(s.H, h, []*pkcs11.Attribute{attr(n, nil)})
	if IsRV(err, pkcs11.CKR_ATTRIBUTE_TYPE_INVALID) || IsRV(err, pkcs11.CKR_ATTRIBUTE_SENSITIVE) {
		return "—", nil
	}
	if err != nil {
		return "", Call("C_GetAttributeValue", nil, err)
	}
	v := a[0].Value
	raw[n] = v
	return showValue(n, v), nil
}

func showValue(n uint, v []byte) string {
	switch {
	case n == pkcs11.CKA_LABEL:
		return string(v)
	case n == pkcs11.CKA_CLASS || n == pkcs11.CKA_KEY_TYPE || n == pkcs11.CKA_VALUE_LEN:
		u, err := ckULong(v)
		if err != nil {
			return hex.EncodeToString(v)
		}
		return ulongName(n, uint(u))
	case len(v) == 1 && isBoolAttr(n):
		return fmt.Sprint(v[0] != 0)
	}
	return hex.EncodeToString(v)
}

// isBoolAttr: for an attribute showValue has not named already (CKA_CLASS,
// CKA_KEY_TYPE, CKA_LABEL, CKA_VALUE_LEN), whether one byte is a CK_BBOOL.
func isBoolAttr(n uint) bool {
	switch n {
	case pkcs11.CKA_ID, pkcs11.CKA_MODULUS, pkcs11.CKA_PUBLIC_EXPONENT, pkcs11.CKA_EC_PARAMS, pkcs11.CKA_EC_POINT:
		return false
	}
	return true
}

func ulongName(n uint, u uint) string {
	names := map[uint]string{}
	switch n {
	case pkcs11.CKA_CLASS:
		names = map[uint]string{pkcs11.CKO_PUBLIC_KEY: "CKO_PUBLIC_KEY", pkcs11.CKO_PRIVATE_KEY: "CKO_PRIVATE_KEY", pkcs11.CKO_SECRET_KEY: "CKO_SECRET_KEY"}
	case pkcs11.CKA_KEY_TYPE:
		names = map[uint]string{pkcs11.CKK_RSA: "CKK_RSA", pkcs11.CKK_EC: "CKK_EC", pkcs11.CKK_AES: "CKK_AES", pkcs11.CKK_GENERIC_SECRET: "CKK_GENERIC_SECRET"}
	}
	if s, ok := names[u]; ok {
		return s
	}
	return fmt.Sprint(u)
}

// showTemplate is an array attribute as "{CKA_A=true, CKA_B=false}",
// sorted by name.
func showTemplate(m map[uint][]byte) string {
	var parts []string
	for t, v := range m {
		parts = append(parts, AttrName(t)+"="+showValue(t, v))
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ", ") + "}"
}
