package ceremony

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Format identifies the transcript format.
const Format = "blindperso-ceremony-transcript/1"

// SignatureAlgorithm: ECDSA P-256 over SHA-256 of the canonical body,
// DER-encoded ECDSA-Sig-Value, base64 (standard alphabet, padded).
const SignatureAlgorithm = "ECDSA-P256-SHA256"

// Transcript is the file: the body, and the signature over
// SHA-256(Canonical(body)).
type Transcript struct {
	Format    string          `json:"format"`
	Body      json.RawMessage `json:"body"`
	Signature Signature       `json:"signature"`
}

// Signature is the transcript's signature.
type Signature struct {
	Algorithm string `json:"algorithm"`
	// KeyFingerprint is SHA-256 of the signing key's DER SPKI, hex.
	KeyFingerprint string `json:"key_fingerprint"`
	Value          string `json:"value"`
}

// Body is what is signed.
type Body struct {
	Format   string   `json:"format"`
	Ceremony string   `json:"ceremony"`
	Script   FileHash `json:"script"`
	Token    TokenRec `json:"token"`
	// Members are the other tokens of the group the keys were
	// replicated to (token.members), each as Token is recorded.
	Members  []TokenRec `json:"members,omitempty"`
	Roles    RolesRec   `json:"roles"`
	Started  string     `json:"started"`
	Finished string     `json:"finished"`
	// Status is "completed" or "failed" (then Error says why).
	Status        string   `json:"status"`
	Error         string   `json:"error,omitempty"`
	Steps         []Step   `json:"steps"`
	Outputs       []Output `json:"outputs"`
	TranscriptKey KeyRec   `json:"transcript_key"`
}

// FileHash names a file and its SHA-256.
type FileHash struct {
	Path   string `json:"path"`
	SHA256 string `json:"sha256"`
}

// TokenRec identifies the token.
type TokenRec struct {
	URI          string `json:"uri"`
	Label        string `json:"label"`
	Manufacturer string `json:"manufacturer"`
	Model        string `json:"model"`
	Serial       string `json:"serial"`
	Module       string `json:"module"`
	Table        string `json:"table"`
	SOPINSource  string `json:"so_pin_source"`
}

// RolesRec are the people present.
type RolesRec struct {
	Operator        string   `json:"operator"`
	SecurityOfficer string   `json:"security_officer,omitempty"`
	Witnesses       []string `json:"witnesses"`
}

// Step is one step: when, with what, and what came of it. Inputs never
// hold a PIN.
type Step struct {
	N      int            `json:"n"`
	Step   string         `json:"step"`
	Time   string         `json:"time"`
	Inputs map[string]any `json:"inputs"`
	Result map[string]any `json:"result"`
}

// Output is a file the ceremony wrote (name relative to the transcript's
// directory).
type Output struct {
	File   string `json:"file"`
	SHA256 string `json:"sha256"`
	Bytes  int    `json:"bytes"`
}

// KeyRec is the transcript signing key.
type KeyRec struct {
	Label       string `json:"label"`
	Fingerprint string `json:"fingerprint"`
	File        string `json:"file"`
}

// VerifyResult is what Verify found.
type VerifyResult struct {
	Body           Body
	KeyFile        string
	KeyFingerprint string
}

// Verify checks a transcript without the token: the signing key's public
// key (keyFile, or the transcript's key file beside it) must have the
// fingerprint the transcript names (and expectFP, if given — compare it
// with the one recorded on paper at the ceremony), the signature must
// verify over the canonical body, and every output listed must have its
// recorded SHA-256. The error names every difference found.
func Verify(path, keyFile, expectFP string) (*VerifyResult, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var tr Transcript
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&tr); err != nil {
		return nil, fmt.Errorf("%s: not a ceremony transcript: %w", path, err)
	}
	if tr.Format != Format {
		return nil, fmt.Errorf("%s: format %q, want %q", path, tr.Format, Format)
	}
	res := &VerifyResult{}
	bdec := json.NewDecoder(bytes.NewReader(tr.Body))
	bdec.DisallowUnknownFields()
	if err := bdec.Decode(&res.Body); err != nil {
		return nil, fmt.Errorf("%s: transcript body: %w", path, err)
	}
	body := &res.Body
	dir := filepath.Dir(path)
	if keyFile == "" {
		if body.TranscriptKey.File == "" || filepath.Base(body.TranscriptKey.File) != body.TranscriptKey.File {
			return nil, fmt.Errorf("%s: transcript key file %q: give --key", path, body.TranscriptKey.File)
		}
		keyFile = filepath.Join(dir, body.TranscriptKey.File)
	}
	res.KeyFile = keyFile
	pub, fp, err := readECPublicKey(keyFile)
	if err != nil {
		return nil, err
	}
	res.KeyFingerprint = fp
	var problems []string
	if fp != body.TranscriptKey.Fingerprint {
		problems = append(problems, fmt.Sprintf("transcript key %s has fingerprint %s, the transcript body names %s", keyFile, fp, body.TranscriptKey.Fingerprint))
	}
	if fp != tr.Signature.KeyFingerprint {
		problems = append(problems, fmt.Sprintf("signature.key_fingerprint %s differs from the key's %s", tr.Signature.KeyFingerprint, fp))
	}
	if expectFP != "" && !strings.EqualFold(expectFP, fp) {
		problems = append(problems, fmt.Sprintf("transcript key fingerprint %s, expected %s", fp, expectFP))
	}
	canon, err := Canonical(tr.Body)
	if err != nil {
		return nil, fmt.Errorf("%s: transcript body: %w", path, err)
	}
	sig, err := base64.StdEncoding.DecodeString(tr.Signature.Value)
	digest := sha256.Sum256(canon)
	switch {
	case tr.Signature.Algorithm != SignatureAlgorithm:
		problems = append(problems, fmt.Sprintf("signature algorithm %q, want %s", tr.Signature.Algorithm, SignatureAlgorithm))
	case err != nil:
		problems = append(problems, "signature value is not base64: "+err.Error())
	case !ecdsa.VerifyASN1(pub, digest[:], sig):
		problems = append(problems, "signature does not verify: the transcript body was changed after signing, or it was signed by another key")
	}
	for _, o := range body.Outputs {
		if filepath.Base(o.File) != o.File {
			problems = append(problems, fmt.Sprintf("output %q: not a file name", o.File))
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, o.File))
		if err != nil {
			problems = append(problems, fmt.Sprintf("output %s: %v", o.File, err))
			continue
		}
		if h := sha256.Sum256(b); hex.EncodeToString(h[:]) != o.SHA256 {
			problems = append(problems, fmt.Sprintf("output %s: SHA-256 %x (%d bytes) differs from the transcript's %s (%d bytes)", o.File, h, len(b), o.SHA256, o.Bytes))
		}
	}
	if len(problems) > 0 {
		return res, fmt.Errorf("%s does not verify:\n  %s", path, strings.Join(problems, "\n  "))
	}
	return res, nil
}

func readECPublicKey(path string) (*ecdsa.PublicKey, string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, "", fmt.Errorf("transcript key: %w", err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PUBLIC KEY" {
		return nil, "", fmt.Errorf("transcript key %s: not a PEM PUBLIC KEY", path)
	}
	k, err := x509.ParsePKIXPublicKey(blk.Bytes)
	if err != nil {
		return nil, "", fmt.Errorf("transcript key %s: %w", path, err)
	}
	pub, ok := k.(*ecdsa.PublicKey)
	if !ok {
		return nil, "", errors.New("transcript key " + path + ": not an ECDSA key")
	}
	h := sha256.Sum256(blk.Bytes)
	return pub, hex.EncodeToString(h[:]), nil
}
