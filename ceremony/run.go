package ceremony

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"blindperso/attest"
	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
)

// Options of Run.
type Options struct {
	// DryRun checks everything (script, token, probe, labels, output
	// files, SO PIN source) and prints every step it would take; it
	// creates no token object and writes no file.
	DryRun bool
	// Log receives one line per step (nil: discarded).
	Log io.Writer
	// Now is the clock (nil: time.Now).
	Now func() time.Time
}

// Result is what a completed ceremony made.
type Result struct {
	Dir        string
	Transcript string
	Body       Body
}

type runner struct {
	s    *Script
	opt  Options
	tok  *hsm.Token
	body Body
	dir  string
	// files reserved (created empty, O_EXCL) and whether written.
	files   map[string]*os.File
	written map[string]bool
	signer  *hsm.SigningKey
	// rotFrom is the existing KEK of kek-rotation (found in preflight).
	rotFrom *hsm.KEKRef
	// roots is chip-attestation.roots, read and checked in preflight.
	roots []byte
	// ktks are ktks[].wrapped, read and checked in preflight, in order;
	// keyImports the key-import keys they name, found in preflight.
	ktks       []wrappedKTK
	keyImports map[string]*hsm.KeyImportRef
	// members are token.members, opened in preflight; repKeys and
	// repKEK the keys of replicate, found there; made the replicable
	// keys this ceremony generates, and profiles the profile of each
	// issuer key's throwaway card in the replication's proof.
	members  []*member
	repKeys  []*hsm.IssuerKeyRef
	repKEK   *hsm.KEKRef
	madeKeys []*hsm.IssuerKeyRef
	madeKEK  *hsm.KEKRef
	profiles map[string]protocol.Profile
}

// member is one of token.members.
type member struct {
	spec  Member
	tok   *hsm.Token
	soPIN string
	rec   TokenRec
}

// wrappedKTK is a ktks[].wrapped file as read.
type wrappedKTK struct {
	ciphertext []byte
	format     string // "raw" or "pem"
	sha256     string // of the file, hex
}

// readWrappedKTK reads a wrapped KTK file: the raw RSA-OAEP ciphertext,
// or one PEM block of type WrappedKTKPEM holding it (leading and trailing
// white space allowed, nothing else).
func readWrappedKTK(path string) (wrappedKTK, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return wrappedKTK{}, err
	}
	h := sha256.Sum256(b)
	c, format, err := export.ParseWrappedKTK(b)
	if err != nil {
		return wrappedKTK{}, fmt.Errorf("%s: %w", path, err)
	}
	return wrappedKTK{ciphertext: c, format: format, sha256: hex.EncodeToString(h[:])}, nil
}

func (r *runner) now() string { return r.opt.Now().UTC().Format(time.RFC3339Nano) }

func (r *runner) logf(f string, a ...any) { fmt.Fprintf(r.opt.Log, f+"\n", a...) }

func (r *runner) step(name string, inputs, result map[string]any) {
	if inputs == nil {
		inputs = map[string]any{}
	}
	if result == nil {
		result = map[string]any{}
	}
	r.body.Steps = append(r.body.Steps, Step{N: len(r.body.Steps) + 1, Step: name, Time: r.now(), Inputs: inputs, Result: result})
}

// Run runs the ceremony of s against its token.
func Run(ctx context.Context, s *Script, opt Options) (*Result, error) {
	if opt.Log == nil {
		opt.Log = io.Discard
	}
	if opt.Now == nil {
		opt.Now = time.Now
	}
	r := &runner{s: s, opt: opt, dir: s.Output, files: map[string]*os.File{}, written: map[string]bool{}}
	scriptHash := sha256.Sum256(s.raw)
	r.body = Body{
		Format: Format, Ceremony: s.Ceremony, Started: r.now(),
		Script: FileHash{Path: s.path, SHA256: hex.EncodeToString(scriptHash[:])},
		Roles:  RolesRec{Operator: s.Roles.Operator, SecurityOfficer: s.Roles.SecurityOfficer, Witnesses: s.Roles.Witnesses},
		Steps:  []Step{}, Outputs: []Output{},
	}
	soPIN, err := r.preflight(ctx)
	if r.tok != nil {
		defer r.tok.Close()
	}
	defer func() {
		for _, m := range r.members {
			m.tok.Close()
		}
	}()
	if err != nil {
		return nil, err
	}
	if opt.DryRun {
		r.plan()
		return nil, nil
	}
	if err := r.reserve(); err != nil {
		return nil, err
	}
	err = r.execute(ctx, soPIN)
	if err != nil {
		r.body.Status, r.body.Error = "failed", err.Error()
	} else {
		r.body.Status = "completed"
	}
	ferr := r.finish()
	if err == nil {
		err = ferr
	} else if ferr != nil {
		err = fmt.Errorf("%w (and the transcript could not be written: %v)", err, ferr)
	} else if r.signer != nil {
		err = fmt.Errorf("%w (the failed ceremony is recorded, signed, in %s)", err, filepath.Join(r.dir, TranscriptFile))
	}
	if err != nil {
		return nil, err
	}
	return &Result{Dir: r.dir, Transcript: filepath.Join(r.dir, TranscriptFile), Body: r.body}, nil
}

// preflight checks everything that can be checked before anything is
// created; it opens the token and probes it.
func (r *runner) preflight(ctx context.Context) (soPIN string, err error) {
	s := r.s
	for i, k := range s.KTKs {
		w, err := readWrappedKTK(k.Wrapped)
		if err != nil {
			return "", fmt.Errorf("ktks[%d].wrapped: %w (nothing was created)", i, err)
		}
		r.ktks = append(r.ktks, w)
	}
	if a := s.ChipAttestation; a != nil {
		if r.roots, err = os.ReadFile(a.Roots); err != nil {
			return "", fmt.Errorf("chip-attestation.roots: %w (nothing was created)", err)
		}
		if _, err := attest.ParseRoots(r.roots); err != nil {
			return "", fmt.Errorf("chip-attestation.roots %s: %w (nothing was created)", a.Roots, err)
		}
	}
	for _, f := range s.Outputs() {
		p := filepath.Join(r.dir, f)
		if _, err := os.Lstat(p); err == nil {
			return "", fmt.Errorf("output file %s already exists: a ceremony never overwrites a file (choose another output directory)", p)
		} else if !errors.Is(err, os.ErrNotExist) {
			return "", err
		}
	}
	r.tok, err = hsm.OpenURI(s.Token.URI, 1)
	if err != nil {
		return "", err
	}
	info := r.tok.Info()
	mech := r.tok.Mechanisms()
	r.body.Token = TokenRec{URI: s.Token.URI, Label: info.Label, Manufacturer: info.Manufacturer, Model: info.Model,
		Serial: info.Serial, Module: info.Module, Table: mech.Name, SOPINSource: s.Token.SOPIN.describe()}
	r.logf("token %q (%s %s, serial %s), table %s", info.Label, info.Manufacturer, info.Model, info.Serial, mech.Name)

	rep, err := r.tok.Probe(ctx)
	if err != nil {
		return "", err
	}
	verdicts := map[string]any{}
	byName := map[string]hsm.ProfileResult{}
	for _, p := range rep.Profiles {
		verdicts[p.Profile] = p.Verdict()
		byName[p.Profile] = p
	}
	r.step("probe", nil, map[string]any{"profiles": verdicts, "wrap_with_trusted": rep.WrapWithTrustedDetail, "rsa_exponent": rep.RSAExponent})
	r.logf("probe: token mechanisms checked by trial")
	for _, k := range s.IssuerKeys {
		for _, name := range k.Profiles {
			p := byName[name]
			if !p.Runnable {
				return "", fmt.Errorf("issuer key %q: token %q cannot run profile %s in-token: missing %s (run issuer probe; choose a profile it can run)",
					k.Label, info.Label, name, strings.Join(p.Missing, ", "))
			}
			r.logf("probe: profile %s %s", name, p.Verdict())
		}
	}
	if rot := s.KEKRotation; rot != nil {
		if r.rotFrom, err = r.tok.FindKEK(ctx, rot.From); err != nil {
			return "", fmt.Errorf("kek-rotation.from: %w (a rotation ceremony makes the next KEK for the one the card keys are under now; nothing was created)", err)
		}
		if mech.EnforcesWrapWithTrusted && !r.rotFrom.Trusted {
			return "", fmt.Errorf("kek-rotation.from: KEK %q in token %q is not CKA_TRUSTED: it is not a KEK this issuer made (nothing was created)", rot.From, info.Label)
		}
		r.logf("kek-rotation: KEK %q found (the new KEK %q is made for issuer kek rotate)", rot.From, rot.To)
	}
	r.keyImports = map[string]*hsm.KeyImportRef{}
	for i, k := range s.KTKs {
		ik := r.keyImports[k.KeyImport]
		if ik == nil {
			if ik, err = r.tok.FindKeyImportKey(ctx, k.KeyImport); err != nil {
				return "", fmt.Errorf("ktks[%d].key-import: %w (a KTK is received under a key-import key an earlier ceremony made with key-import; nothing was created)", i, err)
			}
			if ik.Public.RSA == nil || ik.Public.RSA.N.BitLen() != 3072 {
				return "", fmt.Errorf("ktks[%d].key-import: %q in token %q is not a key-import key (those are %s key pairs; nothing was created)", i, k.KeyImport, info.Label, hsm.KeyImportKind)
			}
			r.keyImports[k.KeyImport] = ik
		}
		if n := ik.Public.RSA.Size(); len(r.ktks[i].ciphertext) != n {
			return "", fmt.Errorf("ktks[%d].wrapped %s: %d bytes of ciphertext (%s), want %d: RSA-OAEP under the key-import key %q (nothing was created)",
				i, k.Wrapped, len(r.ktks[i].ciphertext), r.ktks[i].format, n, k.KeyImport)
		}
		fp := ik.Public.Fingerprint()
		if sfp := k.SenderFingerprint; sfp != "" && !strings.EqualFold(sfp, r.ktks[i].sha256) {
			hint := "this is not the file " + k.Sender + " sent"
			if strings.EqualFold(sfp, hex.EncodeToString(fp[:])) {
				hint = "the sender-fingerprint given is the key-import key's fingerprint; it must be the SHA-256 of the wrapped file the sender sent"
			}
			return "", fmt.Errorf("ktks[%d].wrapped %s has SHA-256 %s, the sender-fingerprint %s differs: %s (nothing was created)",
				i, k.Wrapped, r.ktks[i].sha256, strings.ToLower(sfp), hint)
		}
		r.logf("ktks[%d]: %s from %s (sha256 %s), under key-import key %q (sha256 %x)", i, k.Wrapped, k.Sender, r.ktks[i].sha256, k.KeyImport, fp)
	}
	if s.anyReplicable() {
		if err := r.tok.ReplicationRefusal(); err != nil {
			return "", fmt.Errorf("%w (the script asks for replicable keys or names members; nothing was created)", err)
		}
	}
	if err := r.preflightMembers(ctx, byName); err != nil {
		return "", err
	}
	if needTrust := r.trustedKeys(); len(needTrust) > 0 && mech.EnforcesWrapWithTrusted {
		if s.Token.SOPIN == nil {
			return "", fmt.Errorf("token %q enforces CKA_WRAP_WITH_TRUSTED: the security officer must mark the %s trusted; add token.so-pin (file or env) to the script", info.Label, strings.Join(needTrust, " and the "))
		}
		if soPIN, err = s.Token.SOPIN.read(); err != nil {
			return "", err
		}
	}
	for _, l := range r.labels() {
		used, err := r.tok.LabelInUse(ctx, l)
		if err != nil {
			return "", err
		}
		if used {
			return "", fmt.Errorf("label %q already exists in token %q: a ceremony never reuses a label (choose new labels; nothing was created)", l, info.Label)
		}
	}
	r.step("preflight", map[string]any{"labels": r.labels(), "output": r.dir, "files": s.Outputs()},
		map[string]any{"labels_free": true, "files_absent": true})
	return soPIN, nil
}

// trustedKeys names what the SO marks CKA_TRUSTED where the token
// enforces CKA_WRAP_WITH_TRUSTED.
func (r *runner) trustedKeys() []string {
	var w []string
	if r.s.KEK != nil || r.s.KEKRotation != nil {
		w = append(w, "KEK")
	}
	if len(r.s.KTKs) > 0 {
		w = append(w, "KTK")
	}
	if len(r.s.Token.Members) > 0 {
		w = append(w, "replication's transport key")
	}
	return w
}

func (r *runner) labels() []string {
	l := []string{r.s.TranscriptKey.Label}
	for _, k := range r.s.IssuerKeys {
		l = append(l, k.Label)
	}
	if r.s.KEK != nil {
		l = append(l, r.s.KEK.Label)
	}
	if r.s.KEKRotation != nil {
		l = append(l, r.s.KEKRotation.To)
	}
	if r.s.KeyImport != nil {
		l = append(l, r.s.KeyImport.Label)
	}
	for _, k := range r.s.KTKs {
		l = append(l, k.Label)
	}
	return l
}

// plan prints what a run would do.
func (r *runner) plan() {
	s := r.s
	r.logf("dry run: nothing is created in the token and no file is written")
	n := 0
	say := func(f string, a ...any) { n++; r.logf("would %d. "+f, append([]any{n}, a...)...) }
	say("create directory %s if missing", r.dir)
	say("generate the transcript signing key %q (EC P-256, sign only, non-extractable) and write %s", s.TranscriptKey.Label, filepath.Join(r.dir, s.TranscriptKey.Label+".pub.pem"))
	for _, k := range s.IssuerKeys {
		rep := ""
		if s.replicableKey(k) {
			rep = ", replicable (extractable only under keys the SO made trusted)"
		}
		say("generate issuer key %q (%s%s) for %s and write %s", k.Label, k.Kind, rep, strings.Join(k.Profiles, ", "), filepath.Join(r.dir, k.Label+".pub.pem"))
	}
	if s.KEK != nil {
		if r.tok.Mechanisms().EnforcesWrapWithTrusted {
			rep := ""
			if s.replicableKEK() {
				rep = ", replicable (extractable only under keys the SO made trusted)"
			}
			say("generate KEK %q (AES-256%s); the security officer (%s) marks it CKA_TRUSTED", s.KEK.Label, rep, s.Token.SOPIN.describe())
		} else {
			say("generate KEK %q (AES-256); not marked trusted (the token does not enforce CKA_WRAP_WITH_TRUSTED)", s.KEK.Label)
		}
	}
	if rot := s.KEKRotation; rot != nil {
		trust := "not marked trusted (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if r.tok.Mechanisms().EnforcesWrapWithTrusted {
			trust = fmt.Sprintf("the security officer (%s) marks it CKA_TRUSTED", s.Token.SOPIN.describe())
		}
		rep := ""
		if len(s.Token.Members) > 0 {
			rep = ", replicable (extractable only under keys the SO made trusted)"
		}
		say("generate KEK %q (AES-256%s) as the rotation target of the existing KEK %q; %s (the re-wrap is issuer kek rotate --from %s --to %s, after the ceremony)",
			rot.To, rep, rot.From, trust, rot.From, rot.To)
	}
	if ki := s.KeyImport; ki != nil {
		say("generate the key-import key %q (%s, unwrap of a wrap-only KTK only) and write its public key to %s",
			ki.Label, hsm.KeyImportKind, filepath.Join(r.dir, KeyImportFile(ki.Label)))
	}
	for i, k := range s.KTKs {
		trust := "not marked trusted (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if r.tok.Mechanisms().EnforcesWrapWithTrusted {
			trust = fmt.Sprintf("the security officer (%s) imports it CKA_TRUSTED", s.Token.SOPIN.describe())
		}
		say("import KTK %q from %s (%s, sha256 %s) under the key-import key %q, wrap only; %s",
			k.Label, k.Sender, k.Wrapped, r.ktks[i].sha256, k.KeyImport, trust)
	}
	r.planReplication(say)
	say("write the pinned fingerprints to %s", filepath.Join(r.dir, s.FingerprintFile))
	if a := s.ChipAttestation; a != nil {
		say("trust the chip-vendor roots of %s for attestation and copy them to %s", a.Roots, filepath.Join(r.dir, ChipRootsFile))
	}
	say("sign the transcript in the token and write %s", filepath.Join(r.dir, TranscriptFile))
}

// reserve creates every output file, empty, with O_EXCL.
func (r *runner) reserve() error {
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return err
	}
	for _, f := range r.s.Outputs() {
		fh, err := os.OpenFile(filepath.Join(r.dir, f), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			r.release()
			return fmt.Errorf("output file: %w (a ceremony never overwrites a file)", err)
		}
		r.files[f] = fh
	}
	return nil
}

// release closes the reserved files and removes those not written.
func (r *runner) release() {
	for f, fh := range r.files {
		fh.Close()
		if !r.written[f] {
			os.Remove(filepath.Join(r.dir, f))
		}
	}
	r.files = map[string]*os.File{}
}

// write fills a reserved file and records its hash.
func (r *runner) write(f string, b []byte) (string, error) {
	fh := r.files[f]
	if _, err := fh.Write(b); err != nil {
		return "", err
	}
	if err := fh.Sync(); err != nil {
		return "", err
	}
	if err := fh.Close(); err != nil {
		return "", err
	}
	r.written[f] = true
	h := sha256.Sum256(b)
	hx := hex.EncodeToString(h[:])
	r.body.Outputs = append(r.body.Outputs, Output{File: f, SHA256: hx, Bytes: len(b)})
	return hx, nil
}

func (r *runner) execute(ctx context.Context, soPIN string) error {
	s := r.s
	tk, err := r.tok.GenerateSigningKey(ctx, s.TranscriptKey.Label)
	if err != nil {
		return err
	}
	r.signer = tk
	fp := tk.Fingerprint()
	r.body.TranscriptKey = KeyRec{Label: tk.Label, Fingerprint: hex.EncodeToString(fp[:]), File: s.TranscriptKey.Label + ".pub.pem"}
	fh, err := r.write(r.body.TranscriptKey.File, tk.PublicKeyPEM())
	if err != nil {
		return err
	}
	r.step("generate-transcript-key", map[string]any{"label": tk.Label, "kind": "p256", "usage": "sign"},
		map[string]any{"cka_id": hex.EncodeToString(tk.ID), "fingerprint": r.body.TranscriptKey.Fingerprint, "file": r.body.TranscriptKey.File, "file_sha256": fh})
	r.logf("transcript key %q: sha256 %s", tk.Label, r.body.TranscriptKey.Fingerprint)

	var pins bytes.Buffer
	fmt.Fprintf(&pins, "# blindperso pinned issuer-key fingerprints: SHA-256 of the DER SubjectPublicKeyInfo, hex\n")
	fmt.Fprintf(&pins, "# ceremony %s, token %q serial %s; one line per key: fingerprint label kind profiles\n", s.Ceremony, r.body.Token.Label, r.body.Token.Serial)
	for _, k := range s.IssuerKeys {
		gen := r.tok.GenerateIssuerKey
		if s.replicableKey(k) {
			gen = r.tok.GenerateReplicableIssuerKey
		}
		key, err := gen(ctx, k.Kind, k.Label)
		if err != nil {
			return err
		}
		if key.Replicable {
			r.madeKeys = append(r.madeKeys, key)
		}
		fp := key.Fingerprint()
		file := k.Label + ".pub.pem"
		fh, err := r.write(file, key.PublicKeyPEM())
		if err != nil {
			return err
		}
		r.step("generate-issuer-key", map[string]any{"label": k.Label, "kind": k.Kind, "profiles": k.Profiles, "replicable": key.Replicable},
			map[string]any{"cka_id": hex.EncodeToString(key.ID), "fingerprint": hex.EncodeToString(fp[:]), "file": file, "file_sha256": fh,
				"extractable": replicableNote(key.Replicable)})
		fmt.Fprintf(&pins, "%x %s %s %s\n", fp, k.Label, k.Kind, strings.Join(k.Profiles, ","))
		r.logf("issuer key %q (%s): sha256 %x -> %s", k.Label, k.Kind, fp, file)
	}
	if s.KEK != nil {
		gen := r.tok.GenerateKEK
		if s.replicableKEK() {
			gen = r.tok.GenerateReplicableKEK
		}
		kek, err := gen(ctx, s.KEK.Label, soPIN)
		if err != nil {
			return err
		}
		if kek.Replicable {
			r.madeKEK = kek
		}
		by := "not marked (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if kek.Trusted {
			by = "CKA_TRUSTED, set by the security officer"
		}
		r.step("generate-kek", map[string]any{"label": kek.Label, "kind": "aes256", "so_pin_source": s.Token.SOPIN.describe(), "replicable": kek.Replicable},
			map[string]any{"cka_id": hex.EncodeToString(kek.ID), "trusted": kek.Trusted, "trust": by, "extractable": replicableNote(kek.Replicable)})
		r.logf("KEK %q: AES-256, %s", kek.Label, by)
	}
	if rot := s.KEKRotation; rot != nil {
		gen := r.tok.GenerateKEK
		if len(s.Token.Members) > 0 {
			gen = r.tok.GenerateReplicableKEK
		}
		kek, err := gen(ctx, rot.To, soPIN)
		if err != nil {
			return err
		}
		if kek.Replicable {
			r.madeKEK = kek
		}
		by := "not marked (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
		if kek.Trusted {
			by = "CKA_TRUSTED, set by the security officer"
		}
		r.step("generate-rotation-kek",
			map[string]any{"from": rot.From, "to": rot.To, "kind": "aes256", "so_pin_source": s.Token.SOPIN.describe(), "replicable": kek.Replicable},
			map[string]any{"from_cka_id": hex.EncodeToString(r.rotFrom.ID), "from_trusted": r.rotFrom.Trusted,
				"cka_id": hex.EncodeToString(kek.ID), "trusted": kek.Trusted, "trust": by, "extractable": replicableNote(kek.Replicable),
				"rewrap": fmt.Sprintf("issuer kek rotate --from %s --to %s (with the store; not part of the ceremony)", rot.From, rot.To)})
		r.logf("rotation KEK %q: AES-256, %s; next: issuer kek rotate --from %s --to %s", kek.Label, by, rot.From, rot.To)
	}
	if ki := s.KeyImport; ki != nil {
		if err := r.generateKeyImportKey(ctx, ki.Label); err != nil {
			return err
		}
	}
	for i := range s.KTKs {
		if err := r.importKTK(ctx, i, soPIN); err != nil {
			return err
		}
	}
	if err := r.replicate(ctx, soPIN); err != nil {
		return err
	}
	fh, err = r.write(s.FingerprintFile, pins.Bytes())
	if err != nil {
		return err
	}
	r.step("write-fingerprint-file", map[string]any{"keys": len(s.IssuerKeys)}, map[string]any{"file": s.FingerprintFile, "file_sha256": fh})
	r.logf("pinned fingerprints -> %s", s.FingerprintFile)
	if a := s.ChipAttestation; a != nil {
		return r.trustChipRoots(a.Roots)
	}
	return nil
}

// generateKeyImportKey makes the key-import key pair and writes its
// public key to KeyImportFile(label).
func (r *runner) generateKeyImportKey(ctx context.Context, label string) error {
	ik, err := r.tok.GenerateKeyImportKey(ctx, label)
	if err != nil {
		return err
	}
	fp := ik.Public.Fingerprint()
	file := KeyImportFile(label)
	fh, err := r.write(file, ik.Public.PEM())
	if err != nil {
		return err
	}
	r.step("generate-key-import-key",
		map[string]any{"label": label, "kind": hsm.KeyImportKind, "usage": "unwrap a KTK that can only wrap (hsm.KTKUnwrapTemplate)"},
		map[string]any{"cka_id": hex.EncodeToString(ik.ID), "fingerprint": hex.EncodeToString(fp[:]), "file": file, "file_sha256": fh,
			"sender_encrypts_with": "RSA-OAEP, SHA-1, MGF1-SHA1, empty label (hsm.KeyImportOAEP), an AES-256 KTK"})
	r.logf("key-import key %q (%s): sha256 %x -> %s", label, hsm.KeyImportKind, fp, file)
	return nil
}

// checkValueNote is what the transcript says of a KTK with no check
// value.
const checkValueNote = "not given by this token"

// importKTK receives ktks[i] under its key-import key.
func (r *runner) importKTK(ctx context.Context, i int, soPIN string) error {
	k, w := r.s.KTKs[i], r.ktks[i]
	ik := r.keyImports[k.KeyImport]
	ktk, err := r.tok.ImportKTK(ctx, ik, k.Label, w.ciphertext, soPIN)
	if err != nil {
		return fmt.Errorf("ktks[%d]: %w", i, err)
	}
	ikfp := ik.Public.Fingerprint()
	by := "not marked (the token does not enforce CKA_WRAP_WITH_TRUSTED)"
	if ktk.Trusted {
		by = "CKA_TRUSTED, set by the security officer"
	}
	cv, cvDetail := checkValueNote, "the token leaves CKA_CHECK_VALUE unknown or empty for an unwrapped key (docs/EXPORT.md, Key check values): the receiver's checks are RFC 3394's integrity check at unwrap and a card's MAC verified with the exported K_I"
	if ktk.CheckValue != nil {
		cv, cvDetail = hex.EncodeToString(ktk.CheckValue), "CKA_CHECK_VALUE computed in the token (the first bytes of AES-ECB of a zero block under the KTK): the sender compares it with its own"
	}
	sfp := "not given: compare wrapped_sha256 with the sender out of band"
	inputs := map[string]any{"label": k.Label, "key_import": k.KeyImport, "wrapped": k.Wrapped, "sender": k.Sender, "so_pin_source": r.s.Token.SOPIN.describe()}
	if k.SenderFingerprint != "" {
		inputs["sender_fingerprint"] = strings.ToLower(k.SenderFingerprint)
		sfp = "matches the wrapped file's SHA-256"
	}
	r.step("import-ktk", inputs, map[string]any{
		"cka_id": hex.EncodeToString(ktk.ID), "kind": "aes256", "usage": "wrap only",
		"key_import_cka_id": hex.EncodeToString(ik.ID), "key_import_fingerprint": hex.EncodeToString(ikfp[:]),
		"wrapped_sha256": w.sha256, "wrapped_format": w.format, "wrapped_bytes": len(w.ciphertext),
		"sender_fingerprint": sfp, "check_value": cv, "check_value_detail": cvDetail,
		"trusted": ktk.Trusted, "trust": by,
	})
	r.logf("KTK %q from %s: under key-import key %q, wrapped file sha256 %s, check value %s, %s", k.Label, k.Sender, k.KeyImport, w.sha256, cv, by)
	return nil
}

// trustChipRoots copies the chip-vendor roots to the output and records
// them, with each issuer key's attestation policy, in the transcript.
func (r *runner) trustChipRoots(src string) error {
	roots, err := attest.ParseRoots(r.roots)
	if err != nil {
		return err
	}
	var list []map[string]any
	for _, x := range roots.List() {
		list = append(list, map[string]any{"subject": x.Subject, "sha256": hex.EncodeToString(x.Fingerprint[:]),
			"not_after": x.NotAfter.UTC().Format(time.RFC3339)})
		r.logf("trusted chip-vendor root %q sha256 %x", x.Subject, x.Fingerprint)
	}
	policies := map[string]any{}
	for _, k := range r.s.IssuerKeys {
		p, err := r.s.attestationPolicy(k)
		if err != nil {
			return err
		}
		policies[k.Label] = string(p)
	}
	fh, err := r.write(ChipRootsFile, r.roots)
	if err != nil {
		return err
	}
	r.step("trust-chip-roots", map[string]any{"roots": src},
		map[string]any{"file": ChipRootsFile, "file_sha256": fh, "roots": list, "attestation": policies})
	r.logf("chip-vendor roots -> %s (issuer import/serve --chip-roots)", ChipRootsFile)
	return nil
}

// finish signs and writes the transcript (if the signing key exists) and
// releases the reserved files.
func (r *runner) finish() error {
	defer r.release()
	if r.signer == nil {
		return nil
	}
	r.body.Finished = r.now()
	bodyJSON, err := json.Marshal(r.body)
	if err != nil {
		return err
	}
	canon, err := Canonical(bodyJSON)
	if err != nil {
		return err
	}
	digest := sha256.Sum256(canon)
	sig, err := r.signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		return err
	}
	tr := Transcript{Format: Format, Body: canon, Signature: Signature{
		Algorithm: SignatureAlgorithm, KeyFingerprint: r.body.TranscriptKey.Fingerprint,
		Value: base64.StdEncoding.EncodeToString(sig)}}
	out, err := json.MarshalIndent(tr, "", "  ")
	if err != nil {
		return err
	}
	out = append(out, '\n')
	fh := r.files[TranscriptFile]
	if _, err := fh.Write(out); err != nil {
		return err
	}
	if err := fh.Sync(); err != nil {
		return err
	}
	r.written[TranscriptFile] = true
	r.logf("transcript signed by %q -> %s", r.signer.Label, TranscriptFile)
	return nil
}

// replicableNote is what the transcript says of a key's extractability.
func replicableNote(replicable bool) string {
	if replicable {
		return "only wrapped under a key the security officer marked CKA_TRUSTED (CKA_EXTRACTABLE and CKA_WRAP_WITH_TRUSTED true): replicable to the group's members"
	}
	return "never (CKA_EXTRACTABLE false)"
}
