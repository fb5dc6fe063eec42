// Package pinholder is the adversary who holds the token's user PIN: an
// attacker on the issuer host, who has the PIN from the service's
// pin-source and any PKCS#11 client. Run makes throwaway keys exactly as
// the key ceremony makes them (hsm.Token.GenerateIssuerKey, GenerateKEK,
// GenerateSigningKey), imports a throwaway card under them, tries every
// way out of the token it knows against them, and reports each path
// closed (with the token's refusal) or open (with what came out,
// compared with the secret the throwaway card is known to hold). The
// deployment's own keys are never touched: its attributes are read by
// hsm.Token.Audit instead.
//
// This package reads key values (CKA_VALUE) and decrypts on the host, of
// its throwaway objects only: that is what an attack is. It is a probe
// and a test, never a path of the product.
package pinholder

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/miekg/pkcs11"

	"blindperso/hsm"
	"blindperso/protocol"
)

// Result is one path tried.
type Result struct {
	ID     string `json:"id"`
	Target string `json:"target"` // the key attacked
	Attack string `json:"attack"` // what was tried
	Yields string `json:"yields"` // what it gives the attacker if open
	// Open: the attack got a secret out. Refusal is the token's answer
	// that closed it; Detail what came out, or why it was not tried.
	Open    bool   `json:"open"`
	Tried   bool   `json:"tried"`
	Refusal string `json:"refusal,omitempty"`
	Detail  string `json:"detail,omitempty"`
	// Closable says what closes the path where the token supports it;
	// for an open path on a token that cannot close it, why it stays open.
	Closable string `json:"closable"`
}

// Report is the matrix for one token.
type Report struct {
	Token   string   `json:"token"`
	Table   string   `json:"table"`
	Results []Result `json:"results"`
	Closed  int      `json:"closed"`
	Open    int      `json:"open"`
	Skipped int      `json:"skipped"`
}

// OpenIDs lists the IDs of the open paths, in order.
func (r *Report) OpenIDs() []string {
	var ids []string
	for _, x := range r.Results {
		if x.Open {
			ids = append(ids, x.ID)
		}
	}
	return ids
}

// Options of Run.
type Options struct {
	// UserPIN is the PIN the attacker holds, for the "log in as the SO
	// with the user PIN" path ("" skips it on tokens without login).
	UserPIN string
	// SOPIN, on a token that enforces CKA_WRAP_WITH_TRUSTED, lets Run make
	// a trusted throwaway KEK as the ceremony does; without it the KEK
	// paths are skipped there.
	SOPIN string
	// Replicable makes the throwaway issuer keys and KEK that every path
	// attacks replicable, as a ceremony makes them with replicable: true
	// (replicate.go). Without it, the replication paths attack replicable
	// throwaway keys of their own, made beside the others where the token
	// allows replicable keys (and the SO PIN is given).
	Replicable bool
	// Peer is a second member of a group, PeerSOPIN its SO PIN. With it
	// the throwaway issuer keys and KEK are replicable and replicated as
	// the ceremony replicates them: from the token under attack to Peer,
	// or, with PeerIsSource, from Peer to the token under attack, so that
	// every path attacks the replicas. The replication's transport, as it
	// crossed the host, is the attacker's for the transport paths.
	Peer         *hsm.Token
	PeerSOPIN    string
	PeerIsSource bool
}

// env is what the paths attack: throwaway keys and a card whose secrets
// the host knows.
type env struct {
	tok             *hsm.Token
	rsa, ec         *hsm.IssuerKeyRef
	kek             *hsm.KEKRef
	tk              *hsm.SigningKey
	s32, cRSA       []byte // the RSA card: S (32 bytes) and c = OAEP(S)
	kiAES, kiSHA1   []byte // K_I of rsa-oaep-aes and rsa-oaep-sha1 for that S
	z, cEC          []byte // the EC card: Z and c
	blob            hsm.Blob
	kiBlob          []byte // K_I inside blob (ecdh-p256-aes)
	bRSA, blockRSA  []byte // B and the aes KDF's block for the RSA card
	opt             Options
	ctx             context.Context
	labels          []string
	made            []pkcs11.ObjectHandle // session objects of the path being tried
	skipKEK, skipTK string
	// The export (docs/EXPORT.md): the key-import key, the KTK a
	// receiver sent (its value, which only the receiver knows, kept to
	// confirm a path), the file it sent, and the blob's K_I exported
	// under it.
	ik                   *hsm.KeyImportRef
	ktk                  *hsm.KTKRef
	ktkValue, ktkWrapped []byte
	export               []byte
	// Replication (replicate.go).
	rep rep
}

// Run tries every path on tok and destroys every object it made.
func Run(ctx context.Context, tok *hsm.Token, opt Options) (*Report, error) {
	e := &env{tok: tok, opt: opt, ctx: ctx}
	defer e.cleanup(ctx)
	if err := e.setup(ctx); err != nil {
		return nil, fmt.Errorf("PIN-holder adversary on token %q: %w", tok.Info().Label, err)
	}
	rep := &Report{Token: tok.Info().Label, Table: tok.Mechanisms().Name}
	for _, p := range paths {
		res := Result{ID: p.id, Target: p.target, Attack: p.attack, Yields: p.yields, Closable: p.closable}
		skip := ""
		switch {
		case p.needs == needKEK && e.kek == nil:
			skip = e.skipKEK
		case p.needs == needPIN && e.opt.UserPIN == "":
			skip = "no user PIN (the token needs no login)"
		default:
			skip = e.skipReplication(p.needs)
		}
		if skip != "" {
			res.Detail = "not tried: " + skip
			rep.Skipped++
			rep.Results = append(rep.Results, res)
			continue
		}
		res.Tried = true
		var out string
		var err error
		if p.needs == needPIN {
			out, err = p.try(e, hsm.Session{})
		} else {
			err = tok.With(ctx, func(s hsm.Session) error {
				e.made = e.made[:0]
				var err error
				out, err = p.try(e, s)
				for _, h := range e.made {
					s.P.DestroyObject(s.H, h)
				}
				destroyOwn(s)
				return err
			})
		}
		var refused *refusal
		switch {
		case err == nil:
			res.Open, res.Detail = true, out
			rep.Open++
		case errors.As(err, &refused):
			res.Refusal, res.Detail = refused.rv, refused.step
			rep.Closed++
		default:
			return nil, fmt.Errorf("path %s: %w", p.id, err)
		}
		rep.Results = append(rep.Results, res)
	}
	return rep, nil
}

// refusal is a path closed by the token: the call it refused and its
// return code.
type refusal struct{ step, rv string }

func (r *refusal) Error() string { return r.step + ": " + r.rv }

// refused wraps a PKCS#11 error from an attack step as a refusal: the
// token said no. An invalid handle is not a refusal but a failure of the
// run (a throwaway key was lost), and is reported as such.
func refused(step string, err error) error {
	if err == nil {
		return nil
	}
	if rv, ok := hsm.RV(err); ok && !invalidHandle(uint(rv)) {
		return &refusal{step: step, rv: rvName(rv)}
	}
	return fmt.Errorf("%s: %w", step, err)
}

func (e *env) label(what string) string {
	b := make([]byte, 4)
	rand.Read(b)
	l := fmt.Sprintf("pinholder-%s-%x", what, b)
	e.labels = append(e.labels, l)
	return l
}

func (e *env) setup(ctx context.Context) error {
	var err error
	if e.tok.Mechanisms().EnforcesWrapWithTrusted && e.opt.SOPIN == "" {
		e.skipKEK = "the token enforces CKA_WRAP_WITH_TRUSTED and no SO PIN was given to make a trusted KEK as the ceremony does (--so-pin-file)"
	}
	// The replicable keys (and replicas) first: with Replicable or a
	// Peer they are the ones every path attacks.
	if err := e.setupReplication(ctx); err != nil {
		return err
	}
	if e.rsa == nil {
		if e.rsa, err = e.tok.GenerateIssuerKey(ctx, hsm.KindRSA2048, e.label("rsa")); err != nil {
			return err
		}
		if e.ec, err = e.tok.GenerateIssuerKey(ctx, hsm.KindP256, e.label("ec")); err != nil {
			return err
		}
		if e.skipKEK == "" {
			if e.kek, err = e.tok.GenerateKEK(ctx, e.label("kek"), e.opt.SOPIN); err != nil {
				return err
			}
		}
	}
	if e.tk, err = e.tok.GenerateSigningKey(ctx, e.label("transcript")); err != nil {
		return err
	}
	// The RSA card: a chosen 32-byte S under OAEP, as a card draws it.
	e.s32 = make([]byte, protocol.OAEPSecretLen)
	rand.Read(e.s32)
	if e.cRSA, err = protocol.EncryptSecret(protocol.RSAOAEPAES, e.rsa.Public, e.s32, rand.Reader); err != nil {
		return err
	}
	e.bRSA = protocol.Binding(protocol.RSAOAEPAES, e.rsa.Public.SPKI)
	e.blockRSA = protocol.AESKDFInput(e.bRSA)
	if e.kiAES, err = protocol.DeriveKey(protocol.RSAOAEPAES, e.s32, e.bRSA); err != nil {
		return err
	}
	h := sha1.Sum(append(append([]byte{}, e.s32...), protocol.Binding(protocol.RSAOAEPSHA1, e.rsa.Public.SPKI)...))
	e.kiSHA1 = h[:protocol.KeySize]
	// The EC card, and its K_I stored under the KEK as the importer does.
	p := protocol.ECDHP256AES
	if e.z, e.cEC, err = protocol.Encapsulate(p, e.ec.Public, rand.Reader); err != nil {
		return err
	}
	if e.kiBlob, err = protocol.DeriveKey(p, e.z, protocol.Binding(p, e.ec.Public.SPKI)); err != nil {
		return err
	}
	if e.kek == nil {
		return nil
	}
	// The receiver's KTK, sent as it would be: only its wrapped form
	// crosses to the issuer.
	if e.ik, err = e.tok.GenerateKeyImportKey(ctx, e.label("key-import")); err != nil {
		return err
	}
	e.ktkValue = make([]byte, hsm.KTKLen)
	rand.Read(e.ktkValue)
	if e.ktkWrapped, err = rsa.EncryptOAEP(sha1.New(), rand.Reader, e.ik.Public.RSA, e.ktkValue, nil); err != nil {
		return err
	}
	if e.ktk, err = e.tok.ImportKTK(ctx, e.ik, e.label("ktk"), e.ktkWrapped, e.opt.SOPIN); err != nil {
		return err
	}
	return e.tok.With(ctx, func(s hsm.Session) error {
		sk, err := e.ec.Handle(s)
		if err != nil {
			return err
		}
		kek, err := e.kek.Handle(s)
		if err != nil {
			return err
		}
		if e.blob, err = hsm.ImportCard(s, p, sk, kek, e.ec.Public.SPKI, e.cEC); err != nil {
			return err
		}
		ktk, err := e.ktk.Handle(s)
		if err != nil {
			return err
		}
		x, err := hsm.ExportCardKey(s, kek, ktk, e.blob)
		e.export = x.Wrapped
		if err != nil {
			return err
		}
		return e.repBlobs(s)
	})
}

func (e *env) cleanup(ctx context.Context) {
	for _, l := range e.labels {
		e.tok.DestroyLabel(ctx, l)
		if e.opt.Peer != nil {
			e.opt.Peer.DestroyLabel(ctx, l)
		}
	}
}

// WriteText prints the matrix for a person.
func (r *Report) WriteText(w io.Writer) error {
	fmt.Fprintf(w, "PIN HOLDER (user PIN, any PKCS#11 client) against throwaway keys made as the ceremony makes them, token %q (table %s)\n\n", r.Token, r.Table)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PATH\tTARGET\tRESULT\tDETAIL")
	for _, x := range r.Results {
		res := "closed: " + x.Refusal
		switch {
		case !x.Tried:
			res = "not tried"
		case x.Open:
			res = "OPEN"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", x.ID, x.Target, res, x.Detail)
	}
	tw.Flush()
	fmt.Fprintf(w, "\nclosed %d of %d tried", r.Closed, r.Closed+r.Open)
	if r.Skipped > 0 {
		fmt.Fprintf(w, " (%d not tried)", r.Skipped)
	}
	fmt.Fprintln(w)
	for _, x := range r.Results {
		if x.Open {
			fmt.Fprintf(w, "open  %s: %s → %s. %s\n", x.ID, x.Attack, x.Yields, x.Closable)
		}
	}
	return nil
}

// Summary is one line: "closed N of M; open: a, b".
func (r *Report) Summary() string {
	s := fmt.Sprintf("closed %d of %d", r.Closed, r.Closed+r.Open)
	if ids := r.OpenIDs(); len(ids) > 0 {
		s += "; open: " + strings.Join(ids, ", ")
	}
	return s
}

// MarshalIndent is the report as indented JSON.
func (r *Report) MarshalIndent() ([]byte, error) { return json.MarshalIndent(r, "", "  ") }

// confirm compares what an attack got out with the secret the host knows.
func confirm(got, want []byte, what string) (string, error) {
	if !bytes.Equal(got, want) {
		return "", fmt.Errorf("the attack's output is not %s (%d bytes): the path is not what it seems", what, len(got))
	}
	return fmt.Sprintf("%s on the host (%d bytes, equal to the card's)", what, len(got)), nil
}

func invalidHandle(rv uint) bool {
	switch rv {
	case pkcs11.CKR_OBJECT_HANDLE_INVALID, pkcs11.CKR_KEY_HANDLE_INVALID, pkcs11.CKR_WRAPPING_KEY_HANDLE_INVALID,
		pkcs11.CKR_UNWRAPPING_KEY_HANDLE_INVALID, pkcs11.CKR_SESSION_HANDLE_INVALID:
		return true
	}
	return false
}

// rvName is CKR_… of a return code.
func rvName(rv pkcs11.Error) string {
	if rv == pkcs11.CKR_ACTION_PROHIBITED { // miekg/pkcs11 v1.1.2 has no name for it
		return "CKR_ACTION_PROHIBITED"
	}
	s := rv.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 && i+2 < len(s) {
		return s[i+2:]
	}
	return fmt.Sprintf("CKR_0x%X", uint(rv))
}

// destroyOwn destroys every session object labelled ownLabel, among
// them those a refused C_GenerateKey left (SoftHSM2).
func destroyOwn(s hsm.Session) {
	if err := s.P.FindObjectsInit(s.H, []*pkcs11.Attribute{attr(pkcs11.CKA_LABEL, ownLabel), attr(pkcs11.CKA_TOKEN, false)}); err != nil {
		return
	}
	hs, _, _ := s.P.FindObjects(s.H, 64)
	s.P.FindObjectsFinal(s.H)
	for _, h := range hs {
		s.P.DestroyObject(s.H, h)
	}
}
