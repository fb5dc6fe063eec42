// Package ceremony runs the issuer's key ceremony from a declarative YAML
// script and writes a transcript signed by a key held in the token; it
// also verifies such transcripts without the token. docs/OPERATIONS.md
// describes the workflow; this file the script.
package ceremony

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"gopkg.in/yaml.v3"

	"blindperso/attest"
	"blindperso/export"
	"blindperso/hsm"
	"blindperso/protocol"
)

// Script is a ceremony script. Unknown keys are an error.
type Script struct {
	// Ceremony names the ceremony (recorded in the transcript).
	Ceremony string `yaml:"ceremony"`
	Token    struct {
		// URI is the RFC 7512 URI of the token; the user PIN comes from
		// its pin-source (file: or env:), never from the script.
		URI string `yaml:"uri"`
		// SOPIN says where the security officer's PIN is: exactly one of
		// file or env. Needed only where the token enforces
		// CKA_WRAP_WITH_TRUSTED (the SO marks the KEK trusted).
		SOPIN *PINSource `yaml:"so-pin"`
		// Members are the other tokens of the issuer's group: every
		// issuer key and the KEK the ceremony makes are made replicable
		// on token.uri and copied to each member inside the tokens
		// (hsm.Replicate), with the keys of replicate. Each member needs
		// its own so-pin (its SO makes the KEK's replica trusted).
		Members []Member `yaml:"members"`
	} `yaml:"token"`
	Roles struct {
		Operator        string   `yaml:"operator"`
		SecurityOfficer string   `yaml:"security-officer"`
		Witnesses       []string `yaml:"witnesses"`
	} `yaml:"roles"`
	// Output is the directory the ceremony writes to. It may exist; no
	// file in it is ever overwritten.
	Output string `yaml:"output"`
	// IssuerKeys are the issuer key pairs to create, each for the
	// profiles it will serve.
	IssuerKeys []IssuerKey `yaml:"issuer-keys"`
	KEK        *struct {
		Label string `yaml:"label"`
		// Replicable makes the KEK extractable under trusted keys only,
		// to be copied to members (implied, and required, with members).
		Replicable *bool `yaml:"replicable"`
	} `yaml:"kek"`
	// Replicate names keys an earlier ceremony made replicable on
	// token.uri, to be copied to the members (which must be given).
	Replicate *Replicate `yaml:"replicate"`
	// KEKRotation, if set, generates the next KEK, To, as the target of
	// a KEK rotation away from the existing KEK From: the ceremony checks
	// From is in the token and generates To exactly as kek does (the SO
	// marks it trusted where the token enforces CKA_WRAP_WITH_TRUSTED).
	// The re-wrap itself needs the store and is not part of the ceremony:
	// issuer kek rotate --from From --to To (docs/OPERATIONS.md). With
	// token.members, To is made replicable and copied to every member,
	// each of which must hold From: the group moves to the new KEK
	// together.
	KEKRotation *KEKRotation `yaml:"kek-rotation"`
	// ChipAttestation, if set, names the chip-vendor roots the issuer will
	// trust for attestation (PROTOCOL.md §10): the ceremony checks them,
	// records each root's SHA-256 and each issuer key's policy in the
	// transcript, and copies them to Output as ChipRootsFile, which
	// issuer import and serve take as --chip-roots.
	ChipAttestation *struct {
		Roots string `yaml:"roots"`
	} `yaml:"chip-attestation"`
	// KeyImport, if set, generates the issuer's key-import key pair
	// (hsm.Token.GenerateKeyImportKey: RSA-3072, the private key unwraps a
	// KTK and does nothing else) and writes its public key to Output as
	// KeyImportFile(Label), for receiving systems to wrap their KTK to
	// (docs/EXPORT.md). Its SHA-256 fingerprint is in the transcript; it
	// is not an issuer key and is not in the pinned-fingerprint file.
	KeyImport *struct {
		Label string `yaml:"label"`
	} `yaml:"key-import"`
	// KTKs are key-transport keys receiving systems sent, each wrapped to
	// a key-import key already in the token (made by an earlier
	// ceremony: a KTK cannot be wrapped to the key-import key this
	// ceremony generates, whose public key does not exist yet). Each is
	// imported with hsm.Token.ImportKTK — by the security officer,
	// CKA_TRUSTED, where the token enforces CKA_WRAP_WITH_TRUSTED, so
	// token.so-pin is then required — into a token object that can only
	// wrap. Each wrapped file is the raw RSA-OAEP ciphertext (384 bytes)
	// or one PEM block "BLINDPERSO KTK" holding it (KTK.Wrapped); the
	// transcript records its SHA-256, and sender-fingerprint, if given,
	// must equal it.
	KTKs []KTK `yaml:"ktks"`
	// FingerprintFile is the file (in Output) of pinned fingerprints a
	// card manufacturer masks into ROM (§4.4).
	FingerprintFile string `yaml:"fingerprint-file"`
	TranscriptKey   struct {
		Label string `yaml:"label"`
	} `yaml:"transcript-key"`

	path string // the script file, for the transcript
	raw  []byte
}

// PINSource is where a PIN is read from: a file (trailing newline
// ignored) or an environment variable.
type PINSource struct {
	File string `yaml:"file"`
	Env  string `yaml:"env"`
}

// Member is another token of the issuer's group.
type Member struct {
	// URI is the member's RFC 7512 URI (user PIN by pin-source).
	URI string `yaml:"uri"`
	// SOPIN is where the member's SO PIN is (file or env): required.
	SOPIN *PINSource `yaml:"so-pin"`
}

// Replicate names existing replicable keys of token.uri to copy to the
// members.
type Replicate struct {
	IssuerKeys []string `yaml:"issuer-keys"`
	KEK        string   `yaml:"kek"`
}

// KEKRotation names the KEK blobs are under now (From, which must exist)
// and the KEK the ceremony generates for them to move to (To).
type KEKRotation struct {
	From string `yaml:"from"`
	To   string `yaml:"to"`
}

// KTK is one key-transport key to receive.
type KTK struct {
	// Label is the KTK's label in the token (new: a label in use is
	// refused).
	Label string `yaml:"label"`
	// KeyImport is the label of the key-import key the sender wrapped to.
	KeyImport string `yaml:"key-import"`
	// Wrapped is the file the sender sent: the RSA-OAEP ciphertext of the
	// KTK (hsm.KeyImportOAEP: SHA-1, MGF1-SHA1, empty label) under the
	// key-import public key, either raw — exactly the modulus length, 384
	// bytes, as C_WrapKey returns it — or base64 in one PEM block of type
	// WrappedKTKPEM ("BLINDPERSO KTK"), nothing else in the file.
	Wrapped string `yaml:"wrapped"`
	// Sender names the receiving system (and who sent the file), for
	// the transcript.
	Sender string `yaml:"sender"`
	// SenderFingerprint, if given, is the SHA-256 (hex) of the wrapped
	// file as the sender states it out of band (read over the phone, on
	// a signed letter): the ceremony refuses a file with another hash
	// before anything is made. The key-import public key is public, so
	// anyone can make a file that unwraps; this comparison, done by the
	// witnesses if not here, is what says the KTK is the receiver's.
	SenderFingerprint string `yaml:"sender-fingerprint"`
}

// WrappedKTKPEM is the PEM block type of a wrapped KTK file.
const WrappedKTKPEM = export.KTKPEMType

// KeyImportFile is the key-import public key's file in Output.
func KeyImportFile(label string) string { return "key-import-" + label + ".pub.pem" }

// IssuerKey is one issuer key pair to generate.
type IssuerKey struct {
	Label    string   `yaml:"label"`
	Kind     string   `yaml:"kind"`
	Profiles []string `yaml:"profiles"`
	// Attestation is the key's import policy for chip attestation:
	// required, optional or off; default required with chip-attestation,
	// else off.
	Attestation string `yaml:"attestation"`
	// Replicable makes the private key extractable under trusted keys
	// only, to be copied to members (implied, and required, with
	// members). Default false: never extractable.
	Replicable *bool `yaml:"replicable"`
}

// replicableKey reports whether k is made replicable.
func (s *Script) replicableKey(k IssuerKey) bool {
	return k.Replicable != nil && *k.Replicable || len(s.Token.Members) > 0
}

// keksToCopy names the script's entries that give the members a KEK.
func (s *Script) keksToCopy() []string {
	var l []string
	if s.KEK != nil {
		l = append(l, "kek")
	}
	if s.KEKRotation != nil {
		l = append(l, "kek-rotation")
	}
	if s.Replicate != nil && s.Replicate.KEK != "" {
		l = append(l, "replicate.kek")
	}
	return l
}

// replicableKEK reports whether the KEK is made replicable.
func (s *Script) replicableKEK() bool {
	return s.KEK != nil && (s.KEK.Replicable != nil && *s.KEK.Replicable || len(s.Token.Members) > 0)
}

// anyReplicable reports whether the ceremony makes or copies a
// replicable key (the token must enforce CKA_WRAP_WITH_TRUSTED).
func (s *Script) anyReplicable() bool {
	if len(s.Token.Members) > 0 || s.replicableKEK() {
		return true
	}
	for _, k := range s.IssuerKeys {
		if s.replicableKey(k) {
			return true
		}
	}
	return false
}

// ChipRootsFile is the copy of the trusted chip-vendor roots in Output.
const ChipRootsFile = "chip-roots.pem"

// Load reads and checks a script. Strings in token.uri, token.so-pin.file,
// output, chip-attestation.roots and ktks[].wrapped may use ${VAR}; an
// unset VAR is an error.
func Load(path string) (*Script, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s, err := Parse(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	s.path = path
	return s, nil
}

// Parse decodes a script strictly and checks it.
func Parse(raw []byte) (*Script, error) {
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	s := &Script{raw: raw}
	if err := dec.Decode(s); err != nil {
		msg := strings.TrimPrefix(err.Error(), "yaml: ")
		msg = unknownField.ReplaceAllString(msg, `unknown key "$1" (not part of the ceremony script format)`)
		return nil, fmt.Errorf("ceremony script: %s", msg)
	}
	var extra any
	if err := dec.Decode(&extra); err == nil {
		return nil, errors.New("ceremony script: more than one YAML document")
	}
	if err := s.expand(); err != nil {
		return nil, err
	}
	return s, s.check()
}

// unknownField rewrites yaml.v3's "field X not found in type T".
var unknownField = regexp.MustCompile(`field (\S+) not found in type [^\n]*`)

var envRef = regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`)

func expandEnv(field, v string) (string, error) {
	var missing []string
	out := envRef.ReplaceAllStringFunc(v, func(m string) string {
		name := envRef.FindStringSubmatch(m)[1]
		val, ok := os.LookupEnv(name)
		if !ok {
			missing = append(missing, name)
		}
		return val
	})
	if len(missing) > 0 {
		return "", fmt.Errorf("ceremony script: %s uses ${%s}, which is not set", field, strings.Join(missing, "}, ${"))
	}
	return out, nil
}

func (s *Script) expand() error {
	var err error
	if s.Token.URI, err = expandEnv("token.uri", s.Token.URI); err != nil {
		return err
	}
	if s.Output, err = expandEnv("output", s.Output); err != nil {
		return err
	}
	if s.Token.SOPIN != nil {
		if s.Token.SOPIN.File, err = expandEnv("token.so-pin.file", s.Token.SOPIN.File); err != nil {
			return err
		}
	}
	for i := range s.Token.Members {
		m := &s.Token.Members[i]
		if m.URI, err = expandEnv(fmt.Sprintf("token.members[%d].uri", i), m.URI); err != nil {
			return err
		}
		if m.SOPIN != nil {
			if m.SOPIN.File, err = expandEnv(fmt.Sprintf("token.members[%d].so-pin.file", i), m.SOPIN.File); err != nil {
				return err
			}
		}
	}
	if a := s.ChipAttestation; a != nil {
		if a.Roots, err = expandEnv("chip-attestation.roots", a.Roots); err != nil {
			return err
		}
	}
	for i := range s.KTKs {
		if s.KTKs[i].Wrapped, err = expandEnv(fmt.Sprintf("ktks[%d].wrapped", i), s.KTKs[i].Wrapped); err != nil {
			return err
		}
	}
	return nil
}

var labelRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

func (s *Script) check() error {
	var errs []string
	bad := func(f string, a ...any) { errs = append(errs, fmt.Sprintf(f, a...)) }
	if s.Ceremony == "" {
		bad("ceremony: a name is required")
	}
	if s.Token.URI == "" {
		bad("token.uri is required")
	} else if strings.Contains(s.Token.URI, "pin-value") {
		bad("token.uri: pin-value is refused: give the user PIN by pin-source=file:PATH or env:VAR")
	}
	if p := s.Token.SOPIN; p != nil && (p.File == "") == (p.Env == "") {
		bad("token.so-pin: give exactly one of file or env (never the PIN itself)")
	}
	if s.Roles.Operator == "" {
		bad("roles.operator is required")
	}
	if len(s.Roles.Witnesses) == 0 {
		bad("roles.witnesses: at least one witness is required")
	}
	if s.Output == "" {
		bad("output (a directory) is required")
	}
	if len(s.IssuerKeys) == 0 && s.KEKRotation == nil && s.KeyImport == nil && len(s.KTKs) == 0 && s.Replicate == nil {
		bad("issuer-keys: at least one issuer key is required (or kek-rotation, key-import, ktks or replicate, for a ceremony that makes only those)")
	}
	uris := map[string]string{s.Token.URI: "token.uri"}
	for i, m := range s.Token.Members {
		where := fmt.Sprintf("token.members[%d]", i)
		switch {
		case m.URI == "":
			bad("%s.uri is required", where)
		case strings.Contains(m.URI, "pin-value"):
			bad("%s.uri: pin-value is refused: give the user PIN by pin-source=file:PATH or env:VAR", where)
		case uris[m.URI] != "":
			bad("%s.uri is the same token as %s", where, uris[m.URI])
		default:
			uris[m.URI] = where
		}
		if p := m.SOPIN; p == nil || (p.File == "") == (p.Env == "") {
			bad("%s.so-pin: give exactly one of file or env (the member's security officer makes the KEK's replica trusted)", where)
		}
	}
	members := len(s.Token.Members) > 0
	for i, k := range s.IssuerKeys {
		if members && k.Replicable != nil && !*k.Replicable {
			bad("issuer-keys[%d].replicable is false, but the script names members: the group's members hold the same issuer keys, so every key the ceremony makes is replicated", i)
		}
	}
	if members && s.KEK != nil && s.KEK.Replicable != nil && !*s.KEK.Replicable {
		bad("kek.replicable is false, but the script names members: the group's members hold the same KEK")
	}
	if members && len(s.keksToCopy()) > 1 {
		bad("%s: a replication copies one KEK: copy them in separate ceremonies", strings.Join(s.keksToCopy(), " and "))
	}
	if r := s.Replicate; r != nil {
		if !members {
			bad("replicate: name the members to copy the keys to (token.members)")
		}
		if len(r.IssuerKeys) == 0 && r.KEK == "" {
			bad("replicate: name the issuer-keys and/or the kek to copy")
		}
	}
	labels := map[string]string{}
	label := func(where, l string) {
		switch {
		case l == "":
			bad("%s.label is required", where)
		case !labelRE.MatchString(l):
			bad("%s.label %q: use letters, digits, '.', '_' and '-' (it names files too)", where, l)
		case labels[l] != "":
			bad("%s.label %q is also used by %s: labels must be unique", where, l, labels[l])
		default:
			labels[l] = where
		}
	}
	label("transcript-key", s.TranscriptKey.Label)
	for i, k := range s.IssuerKeys {
		where := fmt.Sprintf("issuer-keys[%d]", i)
		label(where, k.Label)
		switch k.Kind {
		case hsm.KindRSA2048, hsm.KindRSA3072, hsm.KindP256:
		default:
			bad("%s.kind %q: want %s, %s or %s", where, k.Kind, hsm.KindRSA2048, hsm.KindRSA3072, hsm.KindP256)
		}
		if len(k.Profiles) == 0 {
			bad("%s.profiles: name the profiles this key serves", where)
		}
		switch p, err := s.attestationPolicy(k); {
		case err != nil:
			bad("%s.attestation: %v", where, err)
		case p != attest.Off && s.ChipAttestation == nil:
			bad("%s.attestation %s needs chip-attestation.roots (the chip-vendor roots to check against)", where, p)
		}
		for _, name := range k.Profiles {
			p, err := protocol.ProfileByName(name)
			if err != nil {
				bad("%s.profiles: %v", where, err)
				continue
			}
			if ec := p.Transport == protocol.ECDHP256; ec != (k.Kind == hsm.KindP256) {
				bad("%s: profile %s needs a %s key, not %s", where, name, map[bool]string{true: "p256", false: "rsa2048/rsa3072"}[ec], k.Kind)
			}
		}
	}
	if s.KEK != nil {
		label("kek", s.KEK.Label)
	}
	if r := s.KEKRotation; r != nil {
		label("kek-rotation.to", r.To)
		switch {
		case r.From == "":
			bad("kek-rotation.from is required: the label of the KEK the stored card keys are under now")
		case !labelRE.MatchString(r.From):
			bad("kek-rotation.from %q: use letters, digits, '.', '_' and '-'", r.From)
		case r.From == r.To:
			bad("kek-rotation: from and to are the same label %q: the new KEK needs a new label", r.From)
		case labels[r.From] != "":
			bad("kek-rotation.from %q is a label this ceremony creates (%s): it must name the KEK already in the token", r.From, labels[r.From])
		}
	}
	if s.KeyImport != nil {
		label("key-import", s.KeyImport.Label)
	}
	for i, k := range s.KTKs {
		where := fmt.Sprintf("ktks[%d]", i)
		label(where, k.Label)
		switch {
		case k.KeyImport == "":
			bad("%s.key-import is required: the label of the key-import key the sender wrapped the KTK to", where)
		case !labelRE.MatchString(k.KeyImport):
			bad("%s.key-import %q: use letters, digits, '.', '_' and '-'", where, k.KeyImport)
		case s.KeyImport != nil && k.KeyImport == s.KeyImport.Label:
			bad("%s.key-import %q is the key-import key this ceremony generates: no KTK can be wrapped to it before its public key is out; receive the KTK in a later ceremony", where, k.KeyImport)
		case labels[k.KeyImport] != "":
			bad("%s.key-import %q is a label this ceremony creates (%s): it must name a key-import key already in the token", where, k.KeyImport, labels[k.KeyImport])
		}
		if k.Wrapped == "" {
			bad("%s.wrapped: the file of the wrapped KTK the sender sent is required", where)
		}
		if strings.TrimSpace(k.Sender) == "" {
			bad("%s.sender: name the receiving system that sent the KTK", where)
		}
		if fp := k.SenderFingerprint; fp != "" {
			if b, err := hex.DecodeString(fp); err != nil || len(b) != sha256.Size {
				bad("%s.sender-fingerprint %q: want the SHA-256 of the wrapped file, 64 hex digits", where, fp)
			}
		}
	}
	if r := s.Replicate; r != nil {
		names := append(append([]string{}, r.IssuerKeys...), r.KEK)
		for i, l := range names {
			where := fmt.Sprintf("replicate.issuer-keys[%d]", i)
			if i == len(r.IssuerKeys) {
				where = "replicate.kek"
			}
			switch {
			case l == "" && i == len(r.IssuerKeys):
			case !labelRE.MatchString(l):
				bad("%s %q: use letters, digits, '.', '_' and '-'", where, l)
			case labels[l] != "":
				bad("%s %q is a label this ceremony creates (%s): keys the ceremony makes are replicated to the members anyway; replicate names keys already in the token", where, l, labels[l])
			}
		}
	}
	if a := s.ChipAttestation; a != nil && a.Roots == "" {
		bad("chip-attestation.roots: the PEM file of the chip-vendor root certificates is required")
	}
	if s.FingerprintFile == "" {
		s.FingerprintFile = "pinned-fingerprints.txt"
	}
	if filepath.Base(s.FingerprintFile) != s.FingerprintFile {
		bad("fingerprint-file %q: a file name inside output, not a path", s.FingerprintFile)
	}
	files := map[string]bool{}
	for _, f := range s.Outputs() {
		if files[f] {
			bad("output file %s would be written twice: change a label or fingerprint-file", f)
		}
		files[f] = true
	}
	if len(errs) > 0 {
		return errors.New("ceremony script: " + strings.Join(errs, "; "))
	}
	return nil
}

// Outputs are the files the ceremony writes in Output, in order; the
// transcript is last.
func (s *Script) Outputs() []string {
	out := []string{s.TranscriptKey.Label + ".pub.pem"}
	for _, k := range s.IssuerKeys {
		out = append(out, k.Label+".pub.pem")
	}
	if s.KeyImport != nil {
		out = append(out, KeyImportFile(s.KeyImport.Label))
	}
	out = append(out, s.FingerprintFile)
	if s.ChipAttestation != nil {
		out = append(out, ChipRootsFile)
	}
	return append(out, TranscriptFile)
}

// attestationPolicy is k's policy, with the default.
func (s *Script) attestationPolicy(k IssuerKey) (attest.Policy, error) {
	if k.Attestation == "" {
		if s.ChipAttestation != nil {
			return attest.Required, nil
		}
		return attest.Off, nil
	}
	return attest.ParsePolicy(k.Attestation)
}

// TranscriptFile is the transcript's name in the output directory.
const TranscriptFile = "transcript.json"

func (p *PINSource) read() (string, error) {
	if p.Env != "" {
		v, ok := os.LookupEnv(p.Env)
		if !ok {
			return "", fmt.Errorf("SO PIN: environment variable %s is not set", p.Env)
		}
		return v, nil
	}
	b, err := os.ReadFile(p.File)
	if err != nil {
		return "", fmt.Errorf("SO PIN: %w", err)
	}
	return strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), "\r"), nil
}

// describe is how the transcript records a PIN source (never the PIN).
func (p *PINSource) describe() string {
	if p == nil {
		return "none"
	}
	if p.Env != "" {
		return "env:" + p.Env
	}
	return "file:" + p.File
}
