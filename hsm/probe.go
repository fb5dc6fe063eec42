package hsm

import (
	"context"
	"crypto/ecdh"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/big"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/miekg/pkcs11"

	"blindperso/protocol"
)

// The capability probe. A token's mechanism list is not the truth:
// SoftHSM2 lists CKM_RSA_X_509 but will only decrypt with it, never
// unwrap; NSS's "NSS Certificate DB" slot omits CONCATENATE_BASE_AND_DATA
// and SHA1_KEY_DERIVATION yet performs both; whether ECDH1_DERIVE takes
// CKD_SHA1_KDF, or OAEP unwraps with SHA-1, no list says. So every step a
// chain needs is tried once, on throwaway session objects, and the list
// only decides how the result is worded.

// Check is one capability: listed (in the mechanism list with the flag
// it needs) and tried.
type Check struct {
	ID        string `json:"id"`
	What      string `json:"what"`
	Need      string `json:"need"` // how a missing capability is named: "CKM_RSA_X_509 unwrap"
	Mechanism string `json:"mechanism"`
	Listed    bool   `json:"listed"`
	Tried     bool   `json:"tried"`
	Works     bool   `json:"works"`
	Detail    string `json:"detail,omitempty"`
}

// ProfileResult says whether the token can run a profile's chain, plus
// wrapping and authentication, entirely in the token.
type ProfileResult struct {
	Profile  string   `json:"profile"`
	Runnable bool     `json:"runnable"`
	Missing  []string `json:"missing,omitempty"`
	// ByTrial names steps that run although the mechanism list omits
	// them (or their flag).
	ByTrial []string `json:"by_trial,omitempty"`
}

// Verdict is the one-line wording of r.
func (r ProfileResult) Verdict() string {
	switch {
	case !r.Runnable:
		return "not runnable: missing " + strings.Join(r.Missing, ", ")
	case len(r.ByTrial) > 0:
		return "runnable (by trial; not in mechanism list: " + strings.Join(r.ByTrial, ", ") + ")"
	}
	return "runnable"
}

// ProbeReport is what `issuer probe` prints.
type ProbeReport struct {
	Token    TokenInfo       `json:"token"`
	Table    string          `json:"table"`
	Checks   []Check         `json:"checks"`
	Profiles []ProfileResult `json:"profiles"`
	// RSAExponent is the public exponent the token generated (3 if it
	// accepts 3, else 65537), 0 if it generates no RSA keys.
	RSAExponent int `json:"rsa_exponent"`
	// KeyWrap is the RFC 5649 mechanism of the table and whether a trial
	// confirmed it is RFC 5649 (a 24-byte blob for a 16-byte key; RFC
	// 3394 with PKCS#7 padding gives 32).
	KeyWrap         string `json:"key_wrap"`
	KeyWrapVerified bool   `json:"key_wrap_verified"`
	// WrapWithTrusted: whether the token refuses to wrap a
	// CKA_WRAP_WITH_TRUSTED key under an untrusted key, by trial.
	WrapWithTrusted       bool   `json:"wrap_with_trusted_enforced"`
	WrapWithTrustedDetail string `json:"wrap_with_trusted_detail"`
	// Notes are disagreements between the table and the trials, and
	// other facts a person should read.
	Notes []string `json:"notes,omitempty"`
}

// Check IDs.
const (
	ckRSAGen      = "rsa-keygen"
	ckECGen       = "ec-keygen"
	ckAESGen      = "aes-keygen"
	ckX509Unwrap  = "rsa-x509-unwrap"
	ckOAEPGeneric = "rsa-oaep-unwrap-generic"
	ckOAEPAES     = "rsa-oaep-unwrap-aes"
	ckOAEPSHA256  = "rsa-oaep-sha256-unwrap"
	ckConcat      = "concatenate"
	ckSHA1KD      = "sha1-key-derivation"
	ckAESData     = "aes-ecb-encrypt-data"
	ckKBKDF       = "sp800-108-counter-kdf"
	ckECDHNull    = "ecdh-null"
	ckECDHSHA1    = "ecdh-sha1-kdf"
	ckWrap        = "rfc5649-wrap"
	ckCMAC        = "aes-cmac"
)

// checkSpec says what a check is and which mechanism flags make it
// "listed".
type checkSpec struct {
	id, what, need string
	mech           uint // 0: the table's RFC 5649 code
	flags          uint
}

var checkSpecs = []checkSpec{
	{ckRSAGen, "RSA key pair generation", "CKM_RSA_PKCS_KEY_PAIR_GEN", pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, pkcs11.CKF_GENERATE_KEY_PAIR},
	{ckECGen, "EC P-256 key pair generation", "CKM_EC_KEY_PAIR_GEN", pkcs11.CKM_EC_KEY_PAIR_GEN, pkcs11.CKF_GENERATE_KEY_PAIR},
	{ckAESGen, "AES key generation (KEK)", "CKM_AES_KEY_GEN", pkcs11.CKM_AES_KEY_GEN, pkcs11.CKF_GENERATE},
	{ckX509Unwrap, "raw RSA unwrap of c into a secret", "CKM_RSA_X_509 unwrap", pkcs11.CKM_RSA_X_509, pkcs11.CKF_UNWRAP},
	{ckOAEPGeneric, "RSA-OAEP (SHA-1) unwrap into a generic secret", "CKM_RSA_PKCS_OAEP unwrap (SHA-1)", pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.CKF_UNWRAP},
	{ckOAEPAES, "RSA-OAEP (SHA-1) unwrap into an AES key", "CKM_RSA_PKCS_OAEP unwrap (SHA-1)", pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.CKF_UNWRAP},
	{ckOAEPSHA256, "RSA-OAEP (SHA-256, MGF1-SHA256) unwrap into a generic secret", "CKM_RSA_PKCS_OAEP unwrap (SHA-256)", pkcs11.CKM_RSA_PKCS_OAEP, pkcs11.CKF_UNWRAP},
	{ckConcat, "S ‖ B in the token", "CKM_CONCATENATE_BASE_AND_DATA", pkcs11.CKM_CONCATENATE_BASE_AND_DATA, pkcs11.CKF_DERIVE},
	{ckSHA1KD, "SHA-1 of a key into an AES key", "CKM_SHA1_KEY_DERIVATION", pkcs11.CKM_SHA1_KEY_DERIVATION, pkcs11.CKF_DERIVE},
	{ckAESData, "AES-ECB of data under a key into a key", "CKM_AES_ECB_ENCRYPT_DATA", pkcs11.CKM_AES_ECB_ENCRYPT_DATA, pkcs11.CKF_DERIVE},
	{ckKBKDF, "SP 800-108 counter KDF (HMAC-SHA256) into an AES key", "CKM_SP800_108_COUNTER_KDF", MechSP800108CounterKDF, pkcs11.CKF_DERIVE},
	{ckECDHNull, "ECDH, raw shared secret", "CKM_ECDH1_DERIVE", pkcs11.CKM_ECDH1_DERIVE, pkcs11.CKF_DERIVE},
	{ckECDHSHA1, "ECDH with the X9.63 SHA-1 KDF", "CKM_ECDH1_DERIVE with CKD_SHA1_KDF", pkcs11.CKM_ECDH1_DERIVE, pkcs11.CKF_DERIVE},
	{ckWrap, "RFC 5649 wrap and unwrap of K_I", "", 0, pkcs11.CKF_WRAP | pkcs11.CKF_UNWRAP},
	{ckCMAC, "AES-CMAC sign and verify", "CKM_AES_CMAC", pkcs11.CKM_AES_CMAC, pkcs11.CKF_SIGN | pkcs11.CKF_VERIFY},
}

// stepCheck maps a chain step (ChainSteps) to the check that tries it.
func stepCheck(st ChainStep) string {
	switch st.Mechanism {
	case pkcs11.CKM_RSA_X_509:
		return ckX509Unwrap
	case pkcs11.CKM_RSA_PKCS_OAEP:
		if st.KeyType == pkcs11.CKK_AES {
			return ckOAEPAES
		}
		return ckOAEPGeneric
	case pkcs11.CKM_CONCATENATE_BASE_AND_DATA:
		return ckConcat
	case pkcs11.CKM_SHA1_KEY_DERIVATION:
		return ckSHA1KD
	case pkcs11.CKM_AES_ECB_ENCRYPT_DATA:
		return ckAESData
	case MechSP800108CounterKDF:
		return ckKBKDF
	case pkcs11.CKM_ECDH1_DERIVE:
		if st.ECKDF == pkcs11.CKD_SHA1_KDF {
			return ckECDHSHA1
		}
		return ckECDHNull
	}
	return ""
}

// Probe reads the token's mechanism list, tries every step the chains
// need on throwaway session objects (all destroyed), and says which
// profiles the token can run in-token.
func (t *Token) Probe(ctx context.Context) (*ProbeReport, error) {
	r := &ProbeReport{}
	err := t.With(ctx, func(s Session) error {
		// From scratch: With may run this twice.
		*r = ProbeReport{Token: t.Info(), Table: t.mech.Name,
			KeyWrap: fmt.Sprintf("%s (0x%X)", MechName(t.mech.KeyWrapRFC5649), t.mech.KeyWrapRFC5649)}
		p := &prober{s: s, checks: map[string]*Check{}}
		defer p.cleanup()
		if err := p.list(t.Info().Slot); err != nil {
			return err
		}
		p.run(r)
		for _, cs := range checkSpecs {
			r.Checks = append(r.Checks, *p.checks[cs.id])
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("probe token %q: %w", t.info.Label, err)
	}
	if err := r.profiles(); err != nil {
		return nil, err
	}
	r.compareTable(t.mech)
	return r, nil
}

func (r *ProbeReport) check(id string) *Check {
	for i := range r.Checks {
		if r.Checks[i].ID == id {
			return &r.Checks[i]
		}
	}
	return nil
}

// profiles derives each profile's verdict from the chain table: its
// transport's key generation, its steps, and what every profile needs
// on top (the KEK, RFC 5649 wrap, AES-CMAC).
func (r *ProbeReport) profiles() error {
	r.Profiles = nil
	for _, p := range protocol.Profiles() {
		steps, err := ChainSteps(p)
		if err != nil {
			return err
		}
		ids := []string{ckRSAGen}
		if p.Transport == protocol.ECDHP256 {
			ids = []string{ckECGen}
		}
		for _, st := range steps {
			id := stepCheck(st)
			if id == "" {
				return fmt.Errorf("probe: no trial for step %q of %s (add one to hsm/probe.go)", st.Name, p.Name)
			}
			ids = append(ids, id)
		}
		ids = append(ids, ckAESGen, ckWrap, ckCMAC)
		pr := ProfileResult{Profile: p.Name, Runnable: true}
		for _, id := range ids {
			c := r.check(id)
			switch {
			case !c.Works:
				pr.Runnable = false
				if !slices.Contains(pr.Missing, c.Need) {
					pr.Missing = append(pr.Missing, c.Need)
				}
			case !c.Listed && !slices.Contains(pr.ByTrial, c.Need):
				pr.ByTrial = append(pr.ByTrial, c.Need)
			}
		}
		r.Profiles = append(r.Profiles, pr)
	}
	return nil
}

// compareTable notes where the table and the trials disagree: the table
// is what the code relies on, so such a note is a bug report.
func (r *ProbeReport) compareTable(m *Mechanisms) {
	if r.RSAExponent != 0 && r.RSAExponent != m.RSAExponent && !(m.RSAExponent == 65537 && r.RSAExponent == 3) {
		r.Notes = append(r.Notes, fmt.Sprintf("the table says RSA exponent %d, the token generated %d: fix hsm/mechanisms.go", m.RSAExponent, r.RSAExponent))
	}
	if r.RSAExponent == 3 && m.RSAExponent != 3 {
		r.Notes = append(r.Notes, "the token accepts RSA exponent 3 (the paper's choice) but the table asks for 65537")
	}
	if c := r.check(ckWrap); c.Works && !r.KeyWrapVerified {
		r.Notes = append(r.Notes, "the table's RFC 5649 mechanism does not produce RFC 5649 blobs: fix KeyWrapRFC5649 in hsm/mechanisms.go")
	}
	if r.WrapWithTrusted != m.EnforcesWrapWithTrusted {
		r.Notes = append(r.Notes, fmt.Sprintf("the table says EnforcesWrapWithTrusted=%v, the trial says %v: fix hsm/mechanisms.go", m.EnforcesWrapWithTrusted, r.WrapWithTrusted))
	}
	for _, u := range m.UnlistedButWorking {
		for _, c := range r.Checks {
			if c.Mechanism == MechName(u) && !c.Listed && !c.Works {
				r.Notes = append(r.Notes, fmt.Sprintf("the table says %s works although unlisted; the trial failed (%s)", c.Mechanism, c.Detail))
			}
		}
	}
	if r.WrapWithTrusted {
		r.Notes = append(r.Notes, "the KEK must be CKA_TRUSTED (set by the security officer): `issuer kek` asks for the SO PIN")
	}
}

// prober runs the trials in one session and destroys what they make.
type prober struct {
	s      Session
	listed map[uint]uint // mechanism → flags
	checks map[string]*Check
	trash  []pkcs11.ObjectHandle
}

func (p *prober) list(slot uint) error {
	ms, err := p.s.P.GetMechanismList(slot)
	if err != nil {
		return Call("C_GetMechanismList", nil, err)
	}
	p.listed = map[uint]uint{}
	for _, m := range ms {
		info, err := p.s.P.GetMechanismInfo(slot, []*pkcs11.Mechanism{m})
		if err != nil {
			continue
		}
		p.listed[m.Mechanism] = info.Flags
	}
	return nil
}

func (p *prober) cleanup() {
	for _, h := range p.trash {
		p.s.P.DestroyObject(p.s.H, h)
	}
	p.trash = nil
}

func (p *prober) keep(h pkcs11.ObjectHandle) pkcs11.ObjectHandle {
	p.trash = append(p.trash, h)
	return h
}

// record stores a check's trial result.
func (p *prober) record(spec checkSpec, mech uint, err error, tried bool, note string) {
	flags, ok := p.listed[mech]
	c := &Check{ID: spec.id, What: spec.what, Need: spec.need, Mechanism: MechName(mech),
		Listed: ok && flags&spec.flags == spec.flags, Tried: tried, Works: tried && err == nil, Detail: note}
	if c.Need == "" {
		c.Need = MechName(mech)
	}
	if err != nil && err != errNotTried {
		c.Detail = rvWord(err)
	}
	p.checks[spec.id] = c
}

// rvWord is a trial's error in one word where there is one: the CKR_ name.
func rvWord(err error) string {
	if rv, ok := RV(err); ok {
		s := rv.Error()
		if i := strings.LastIndex(s, ": "); i >= 0 {
			return s[i+2:]
		}
		return s
	}
	return err.Error()
}

// errNotTried marks a check that could not be tried because an earlier
// step (making its key) failed.
var errNotTried = errors.New("not tried")

func specOf(id string) checkSpec {
	for _, cs := range checkSpecs {
		if cs.id == id {
			return cs
		}
	}
	panic("probe: unknown check " + id)
}

// secretTemplate is the template of a throwaway session secret key.
func secretTemplate(keyType uint, valueLen int, extra ...*pkcs11.Attribute) []*pkcs11.Attribute {
	t := []*pkcs11.Attribute{
		attr(pkcs11.CKA_CLASS, pkcs11.CKO_SECRET_KEY), attr(pkcs11.CKA_KEY_TYPE, keyType),
		attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_SENSITIVE, true),
	}
	if valueLen > 0 {
		t = append(t, attr(pkcs11.CKA_VALUE_LEN, valueLen))
	}
	return append(t, extra...)
}

func (p *prober) run(r *ProbeReport) {
	p.trySymmetric(r)
	p.tryRSA(r)
	p.tryEC()
}

// trySymmetric: AES keygen, AES_ECB_ENCRYPT_DATA, CONCATENATE, SHA-1
// derivation, the SP 800-108 counter KDF, RFC 5649, AES-CMAC, and
// CKA_WRAP_WITH_TRUSTED enforcement.
func (p *prober) trySymmetric(r *ProbeReport) {
	s := p.s
	gen := func(mech uint, tmpl []*pkcs11.Attribute) (pkcs11.ObjectHandle, error) {
		m := pkcs11.NewMechanism(mech, nil)
		h, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{m}, tmpl)
		if err != nil {
			return 0, Call("C_GenerateKey", m, err)
		}
		return p.keep(h), nil
	}
	aes256, err := gen(pkcs11.CKM_AES_KEY_GEN, secretTemplate(pkcs11.CKK_AES, 32,
		attr(pkcs11.CKA_DERIVE, true), attr(pkcs11.CKA_WRAP, true), attr(pkcs11.CKA_UNWRAP, true)))
	p.record(specOf(ckAESGen), pkcs11.CKM_AES_KEY_GEN, err, true, "")
	if err != nil {
		for _, id := range []string{ckAESData, ckWrap, ckCMAC} {
			p.record(specOf(id), specOf(id).mech, errNotTried, false, "")
		}
	} else {
		p.record(specOf(ckAESData), pkcs11.CKM_AES_ECB_ENCRYPT_DATA,
			p.derive(pkcs11.CKM_AES_ECB_ENCRYPT_DATA, aes256, make([]byte, 16), secretTemplate(pkcs11.CKK_AES, 16)), true, "")
		p.tryWrap(r, aes256)
		p.tryCMAC()
	}
	// The SP 800-108 KDF; its result is wrapped under aes256 if there is one.
	p.record(specOf(ckKBKDF), MechSP800108CounterKDF, p.tryKBKDF(aes256), true, "")

	// CONCATENATE and SHA-1 derivation start from a generic secret.
	base, err := gen(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, secretTemplate(pkcs11.CKK_GENERIC_SECRET, 32, attr(pkcs11.CKA_DERIVE, true)))
	if err != nil {
		p.record(specOf(ckConcat), pkcs11.CKM_CONCATENATE_BASE_AND_DATA, err, false, "")
		p.record(specOf(ckSHA1KD), pkcs11.CKM_SHA1_KEY_DERIVATION, err, false, "")
		return
	}
	p.record(specOf(ckConcat), pkcs11.CKM_CONCATENATE_BASE_AND_DATA,
		p.derive(pkcs11.CKM_CONCATENATE_BASE_AND_DATA, base, []byte("blindperso probe"),
			secretTemplate(pkcs11.CKK_GENERIC_SECRET, 0, attr(pkcs11.CKA_DERIVE, true))), true, "")
	p.record(specOf(ckSHA1KD), pkcs11.CKM_SHA1_KEY_DERIVATION,
		p.derive(pkcs11.CKM_SHA1_KEY_DERIVATION, base, nil, secretTemplate(pkcs11.CKK_AES, protocol.KeySize)), true, "")
}

// derive runs one C_DeriveKey with string data (nil: no parameter).
func (p *prober) derive(mech uint, base pkcs11.ObjectHandle, data []byte, tmpl []*pkcs11.Attribute) error {
	var m *pkcs11.Mechanism
	if data != nil {
		param, mem, err := derivationStringData(data)
		if err != nil {
			return err
		}
		defer mem.free()
		m = pkcs11.NewMechanism(mech, param)
	} else {
		m = pkcs11.NewMechanism(mech, nil)
	}
	h, err := p.s.P.DeriveKey(p.s.H, []*pkcs11.Mechanism{m}, base, tmpl)
	if err != nil {
		return Call("C_DeriveKey", m, err)
	}
	p.keep(h)
	return nil
}

// tryKBKDF runs the kbkdf profiles' step (chain.go kbkdfKI) as the chain
// does, with meaningless context: from a throwaway non-extractable
// generic secret (as S and Z are) to an AES-128 key whose template, like
// K_I's, leaves CKA_EXTRACTABLE to the token; then that key must wrap
// under kek with the table's RFC 5649 code, as K_I must be stored.
func (p *prober) tryKBKDF(kek pkcs11.ObjectHandle) error {
	s := p.s
	gen := pkcs11.NewMechanism(pkcs11.CKM_GENERIC_SECRET_KEY_GEN, nil)
	base, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{gen}, secretTemplate(pkcs11.CKK_GENERIC_SECRET, 32,
		attr(pkcs11.CKA_DERIVE, true), attr(pkcs11.CKA_EXTRACTABLE, false)))
	if err != nil {
		return Call("C_GenerateKey", gen, err)
	}
	p.keep(base)
	param, mem, err := sp800108CounterParams(kbkdfPRF, []byte(protocol.KBKDFLabel), []byte("blindperso probe"))
	if err != nil {
		return err
	}
	defer mem.free()
	m := pkcs11.NewMechanism(MechSP800108CounterKDF, param)
	h, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, base, secretTemplate(pkcs11.CKK_AES, protocol.KeySize))
	if err != nil {
		return Call("C_DeriveKey", m, err)
	}
	p.keep(h)
	if kek == 0 {
		return nil
	}
	if _, err := p.wrap(s.M.KeyWrapRFC5649, kek, h); err != nil {
		return fmt.Errorf("the derived key cannot be wrapped for storage: %w",
			Call("C_WrapKey", pkcs11.NewMechanism(s.M.KeyWrapRFC5649, nil), err))
	}
	return nil
}

// wrap wraps key under kek with a parameterless mechanism, by the direct
// call where available (NSS softokn misreports the KWP output length to
// miekg/pkcs11's length query; see wrapKeyDirect).
func (p *prober) wrap(mech uint, kek, key pkcs11.ObjectHandle) ([]byte, error) {
	b, ok, err := wrapKeyDirect(p.s, mech, kek, key)
	if !ok {
		b, err = p.s.P.WrapKey(p.s.H, []*pkcs11.Mechanism{pkcs11.NewMechanism(mech, nil)}, kek, key)
	}
	return b, err
}

// tryWrap checks the table's RFC 5649 code by the length of its output,
// unwraps the blob again, and tries CKA_WRAP_WITH_TRUSTED enforcement.
func (p *prober) tryWrap(r *ProbeReport, kek pkcs11.ObjectHandle) {
	s := p.s
	mech := s.M.KeyWrapRFC5649
	spec := specOf(ckWrap)
	spec.need = MechName(mech) + " (RFC 5649)"
	gen := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
	key, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{gen}, secretTemplate(pkcs11.CKK_AES, 16,
		attr(pkcs11.CKA_EXTRACTABLE, true)))
	if err != nil {
		p.record(spec, mech, Call("C_GenerateKey", gen, err), false, "")
		return
	}
	p.keep(key)
	blob, err := p.wrap(mech, kek, key)
	note := ""
	if err == nil {
		// RFC 5649 of 16 bytes: 8-byte AIV block + 16 = 24 bytes. RFC 3394
		// after PKCS#7 padding (NSS's 0x210A): 8 + 24 = 32.
		r.KeyWrapVerified = len(blob) == 24
		note = fmt.Sprintf("%d-byte blob for a 16-byte key", len(blob))
		if !r.KeyWrapVerified {
			err = fmt.Errorf("%s: not RFC 5649", note)
		} else {
			m := pkcs11.NewMechanism(mech, nil)
			h, uerr := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, kek, blob, secretTemplate(pkcs11.CKK_AES, 0, attr(pkcs11.CKA_VERIFY, true)))
			if uerr != nil {
				err = Call("C_UnwrapKey", m, uerr)
			} else {
				p.keep(h)
			}
		}
	}
	p.record(spec, mech, err, true, note)
	p.tryTrusted(r, kek)
}

// tryTrusted makes a key with CKA_WRAP_WITH_TRUSTED and wraps it under an
// untrusted one: a token that enforces the attribute refuses.
func (p *prober) tryTrusted(r *ProbeReport, untrusted pkcs11.ObjectHandle) {
	s := p.s
	gen := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
	key, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{gen}, secretTemplate(pkcs11.CKK_AES, 16,
		attr(pkcs11.CKA_EXTRACTABLE, true), attr(pkcs11.CKA_WRAP_WITH_TRUSTED, true)))
	if err != nil {
		r.WrapWithTrustedDetail = "not supported: a key with CKA_WRAP_WITH_TRUSTED cannot be made (" + rvWord(err) + ")"
		return
	}
	p.keep(key)
	_, err = p.wrap(pkcs11.CKM_AES_KEY_WRAP, untrusted, key)
	switch {
	case IsRV(err, pkcs11.CKR_KEY_NOT_WRAPPABLE):
		r.WrapWithTrusted = true
		r.WrapWithTrustedDetail = "enforced (by trial: wrapping under an untrusted key is refused with CKR_KEY_NOT_WRAPPABLE)"
	case err == nil:
		r.WrapWithTrustedDetail = "not enforced (by trial: a CKA_WRAP_WITH_TRUSTED key wrapped under an untrusted key)"
	default:
		r.WrapWithTrustedDetail = "unknown: the trial wrap failed with " + rvWord(err)
	}
}

func (p *prober) tryCMAC() {
	s := p.s
	spec := specOf(ckCMAC)
	gen := pkcs11.NewMechanism(pkcs11.CKM_AES_KEY_GEN, nil)
	key, err := s.P.GenerateKey(s.H, []*pkcs11.Mechanism{gen}, secretTemplate(pkcs11.CKK_AES, 16,
		attr(pkcs11.CKA_SIGN, true), attr(pkcs11.CKA_VERIFY, true)))
	if err != nil {
		p.record(spec, pkcs11.CKM_AES_CMAC, Call("C_GenerateKey", gen, err), false, "")
		return
	}
	p.keep(key)
	m := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_AES_CMAC, nil)}
	msg := []byte("blindperso probe")
	var mac []byte
	if err = s.P.SignInit(s.H, m, key); err == nil {
		mac, err = s.P.Sign(s.H, msg)
	}
	if err != nil {
		p.record(spec, pkcs11.CKM_AES_CMAC, Call("C_Sign", m[0], err), true, "")
		return
	}
	note := ""
	if verr := s.P.VerifyInit(s.H, m, key); verr != nil {
		// The chains then compare a C_Sign output (a MAC, not a key).
		note = "C_VerifyInit refused (" + rvWord(verr) + "): MACs are checked by C_Sign and compare"
	} else if verr := s.P.Verify(s.H, msg, mac); verr != nil {
		err = Call("C_Verify", m[0], verr)
	}
	p.record(spec, pkcs11.CKM_AES_CMAC, err, true, note)
}

// tryRSA generates a throwaway RSA key (e = 3 if the token takes it, else
// 65537) and unwraps host-made ciphertexts of random, meaningless secrets
// with X.509 and OAEP.
func (p *prober) tryRSA(r *ProbeReport) {
	s := p.s
	var pub *rsa.PublicKey
	var priv pkcs11.ObjectHandle
	var err error
	for _, e := range []int{3, 65537} {
		if pub, priv, err = p.rsaKey(e); err == nil {
			r.RSAExponent = e
			break
		}
		if e == 3 {
			r.Notes = append(r.Notes, "RSA exponent 3 refused ("+rvWord(err)+"); keys get 65537")
		}
	}
	note := ""
	if r.RSAExponent != 0 {
		note = fmt.Sprintf("e=%d", r.RSAExponent)
	}
	p.record(specOf(ckRSAGen), pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, err, true, note)
	if err != nil {
		for _, id := range []string{ckX509Unwrap, ckOAEPGeneric, ckOAEPAES, ckOAEPSHA256} {
			p.record(specOf(id), specOf(id).mech, errNotTried, false, "")
		}
		return
	}
	unwrap := func(m *pkcs11.Mechanism, c []byte, keyType uint) error {
		h, err := s.P.UnwrapKey(s.H, []*pkcs11.Mechanism{m}, priv, c, secretTemplate(keyType, 0, attr(pkcs11.CKA_DERIVE, true)))
		if err != nil {
			return Call("C_UnwrapKey", m, err)
		}
		p.keep(h)
		return nil
	}
	rr, _ := rand.Int(rand.Reader, pub.N)
	c := new(big.Int).Exp(rr, big.NewInt(int64(pub.E)), pub.N).FillBytes(make([]byte, pub.Size()))
	p.record(specOf(ckX509Unwrap), pkcs11.CKM_RSA_X_509,
		unwrap(pkcs11.NewMechanism(pkcs11.CKM_RSA_X_509, nil), c, pkcs11.CKK_GENERIC_SECRET), true, "")
	oaep := func() *pkcs11.Mechanism {
		return pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
			pkcs11.NewOAEPParams(pkcs11.CKM_SHA_1, pkcs11.CKG_MGF1_SHA1, pkcs11.CKZ_DATA_SPECIFIED, nil))
	}
	secret := make([]byte, protocol.OAEPSecretLen)
	rand.Read(secret)
	c, err = rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, secret, nil)
	if err != nil {
		p.record(specOf(ckOAEPGeneric), pkcs11.CKM_RSA_PKCS_OAEP, err, false, "")
		p.record(specOf(ckOAEPAES), pkcs11.CKM_RSA_PKCS_OAEP, err, false, "")
		p.record(specOf(ckOAEPSHA256), pkcs11.CKM_RSA_PKCS_OAEP, err, false, "")
		return
	}
	p.record(specOf(ckOAEPGeneric), pkcs11.CKM_RSA_PKCS_OAEP, unwrap(oaep(), c, pkcs11.CKK_GENERIC_SECRET), true, "")
	p.record(specOf(ckOAEPAES), pkcs11.CKM_RSA_PKCS_OAEP, unwrap(oaep(), c, pkcs11.CKK_AES), true, "")
	// SHA-256 OAEP: no profile uses it (rsa-oaep is SHA-1), but it is
	// what a token can do (SoftHSM2 2.6.1 refuses it: CKR_ARGUMENTS_BAD).
	c, err = rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, secret, nil)
	tried := err == nil
	if tried {
		err = unwrap(pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_OAEP,
			pkcs11.NewOAEPParams(pkcs11.CKM_SHA256, pkcs11.CKG_MGF1_SHA256, pkcs11.CKZ_DATA_SPECIFIED, nil)), c, pkcs11.CKK_GENERIC_SECRET)
	}
	p.record(specOf(ckOAEPSHA256), pkcs11.CKM_RSA_PKCS_OAEP, err, tried, "")
}

func (p *prober) rsaKey(e int) (*rsa.PublicKey, pkcs11.ObjectHandle, error) {
	s := p.s
	m := pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil)
	pubH, privH, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_MODULUS_BITS, 2048),
			attr(pkcs11.CKA_PUBLIC_EXPONENT, big.NewInt(int64(e)).Bytes())},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_UNWRAP, true), attr(pkcs11.CKA_DECRYPT, false)})
	if err != nil {
		return nil, 0, Call("C_GenerateKeyPair", m, err)
	}
	p.keep(pubH)
	p.keep(privH)
	a, err := s.P.GetAttributeValue(s.H, pubH, []*pkcs11.Attribute{attr(pkcs11.CKA_MODULUS, nil), attr(pkcs11.CKA_PUBLIC_EXPONENT, nil)})
	if err != nil {
		return nil, 0, Call("C_GetAttributeValue", nil, err)
	}
	got := new(big.Int).SetBytes(a[1].Value)
	if got.Cmp(big.NewInt(int64(e))) != 0 {
		return nil, 0, fmt.Errorf("asked for exponent %d, got %v", e, got)
	}
	return &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: e}, privH, nil
}

// tryEC generates a throwaway P-256 key and derives from a host-made
// ephemeral public key, with CKD_NULL and with CKD_SHA1_KDF.
func (p *prober) tryEC() {
	s := p.s
	m := pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)
	pubH, privH, err := s.P.GenerateKeyPair(s.H, []*pkcs11.Mechanism{m},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_EC_PARAMS, ecParamsP256)},
		[]*pkcs11.Attribute{attr(pkcs11.CKA_TOKEN, false), attr(pkcs11.CKA_PRIVATE, true), attr(pkcs11.CKA_SENSITIVE, true),
			attr(pkcs11.CKA_EXTRACTABLE, false), attr(pkcs11.CKA_DERIVE, true)})
	if err == nil {
		p.keep(pubH)
		p.keep(privH)
	}
	p.record(specOf(ckECGen), pkcs11.CKM_EC_KEY_PAIR_GEN, Call("C_GenerateKeyPair", m, err), true, "")
	if err != nil {
		p.record(specOf(ckECDHNull), pkcs11.CKM_ECDH1_DERIVE, errNotTried, false, "")
		p.record(specOf(ckECDHSHA1), pkcs11.CKM_ECDH1_DERIVE, errNotTried, false, "")
		return
	}
	eph, _ := ecdh.P256().GenerateKey(rand.Reader)
	point := eph.PublicKey().Bytes()
	derive := func(kdf uint, shared []byte, valueLen int) error {
		m := pkcs11.NewMechanism(pkcs11.CKM_ECDH1_DERIVE, pkcs11.NewECDH1DeriveParams(kdf, shared, point))
		h, err := s.P.DeriveKey(s.H, []*pkcs11.Mechanism{m}, privH, secretTemplate(pkcs11.CKK_AES, valueLen))
		if err != nil {
			return Call("C_DeriveKey", m, err)
		}
		p.keep(h)
		return nil
	}
	p.record(specOf(ckECDHNull), pkcs11.CKM_ECDH1_DERIVE, derive(pkcs11.CKD_NULL, nil, 32), true, "")
	p.record(specOf(ckECDHSHA1), pkcs11.CKM_ECDH1_DERIVE, derive(pkcs11.CKD_SHA1_KDF, []byte("blindperso probe"), protocol.KeySize), true, "")
}

// WriteText prints the report for a person: the token, the capability
// table, the per-profile verdicts, and the facts the key ceremony needs.
func (r *ProbeReport) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	i := r.Token
	fmt.Fprintf(tw, "token\t%q (%s / %s, serial %s, slot %d)\n", i.Label, i.Manufacturer, i.Model, i.Serial, i.Slot)
	fmt.Fprintf(tw, "module\t%s\n", i.Module)
	fmt.Fprintf(tw, "table\t%s\n\n", r.Table)
	fmt.Fprintln(tw, "CAPABILITY\tMECHANISM\tLISTED\tTRIAL")
	for _, c := range r.Checks {
		trial := "fails"
		switch {
		case !c.Tried:
			trial = "not tried"
		case c.Works:
			trial = "works"
		}
		if c.Detail != "" {
			trial += ": " + c.Detail
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", c.What, c.Need, yesNo(c.Listed), trial)
	}
	fmt.Fprintln(tw, "\nPROFILE\tRESULT")
	for _, p := range r.Profiles {
		fmt.Fprintf(tw, "%s\t%s\n", p.Profile, p.Verdict())
	}
	fmt.Fprintln(tw)
	verified := "NOT verified"
	if r.KeyWrapVerified {
		verified = "verified by trial"
	}
	fmt.Fprintf(tw, "RFC 5649 key wrap\t%s, %s\n", r.KeyWrap, verified)
	if r.RSAExponent != 0 {
		fmt.Fprintf(tw, "RSA exponent\tgenerates e=%d\n", r.RSAExponent)
	}
	fmt.Fprintf(tw, "CKA_WRAP_WITH_TRUSTED\t%s\n", r.WrapWithTrustedDetail)
	for _, n := range r.Notes {
		fmt.Fprintf(tw, "note\t%s\n", n)
	}
	return tw.Flush()
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}
