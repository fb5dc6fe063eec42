// Package card is the blindperso applet: the card side of the protocol,
// with the command set, life cycle and status words of docs/PROTOCOL.md.
//
// An Applet is a virtual card. Its persistent state (what a chip keeps in
// EEPROM, K_I included) lives in a file that is replaced atomically, so a
// power loss at any instant leaves the card either as it was before a
// command or as it is after it. Its session state (selection, a command
// chain in progress, response bytes waiting for GET RESPONSE) is lost on
// every power off, power on and reset, as on a chip.
//
// A card manufactured with an Attestation also speaks Extension A (§10):
// it signs what it made on PERSONALIZE under a key its chip vendor
// certified, so the issuer can tell its records from a station's forgeries.
package card

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"

	"blindperso/internal/iso7816"
	"blindperso/protocol"
)

// ATR is the card's answer to reset: direct convention, T=1, and the
// historical bytes "blindperso", with its check byte.
var ATR = func() []byte {
	atr := []byte{0x3B, 0x8A, 0x80, 0x01}
	atr = append(atr, "blindperso"...)
	var tck byte
	for _, b := range atr[1:] {
		tck ^= b
	}
	return append(atr, tck)
}()

// Applet is one virtual card. It is safe for concurrent use, although a
// reader only ever talks to it from one goroutine.
type Applet struct {
	mu   sync.Mutex
	path string
	st   state
	rand io.Reader

	// Session state, lost on power off, power on and reset.
	selected bool
	chain    *chain
	pending  []byte // response bytes waiting for GET RESPONSE
}

type chain struct {
	ins, p1, p2 byte
	data        []byte
}

// Options are the manufacture-time settings of a card.
type Options struct {
	// ID is the card's identifier (serial number), 1 to 16 bytes.
	ID []byte
	// Pinned, if set, is the SHA-256 fingerprint of the only issuer
	// SubjectPublicKeyInfo the card will accept (§4.4).
	Pinned []byte
	// Attestation, if set, makes the card an attested one (PROTOCOL.md
	// §10): it signs what it makes on PERSONALIZE. Nil: a card of
	// version 1 alone, as before the extension.
	Attestation *Attestation
}

// Attestation is what a chip vendor's pre-personalization gives a card
// (§10.1); package chipca makes one for tests and vcard.
type Attestation struct {
	// Key is the card's ECDSA P-256 attestation key.
	Key *ecdsa.PrivateKey
	// Chain is the card's certificate, which must certify Key, then the
	// CA certificates that issued it, DER each, without the root.
	Chain [][]byte
}

// Manufacture creates a blank card whose state lives at path. It refuses
// to overwrite an existing card.
func Manufacture(path string, o Options) (*Applet, error) {
	st := state{Format: stateFormat, ID: o.ID, Pinned: o.Pinned, LifeCycle: protocol.Blank}
	if at := o.Attestation; at != nil {
		if at.Key == nil {
			return nil, errors.New("manufacture card: attestation without a key")
		}
		der, err := x509.MarshalPKCS8PrivateKey(at.Key)
		if err != nil {
			return nil, fmt.Errorf("manufacture card: attestation key: %w", err)
		}
		st.AttestKey = der
		for _, c := range at.Chain {
			st.AttestChain = append(st.AttestChain, bytes.Clone(c))
		}
	}
	if err := st.validate(); err != nil {
		return nil, fmt.Errorf("manufacture card: %w", err)
	}
	if _, err := os.Lstat(path); err == nil {
		return nil, fmt.Errorf("manufacture card: %s already exists", path)
	}
	a := &Applet{path: path, st: st, rand: rand.Reader}
	if err := a.persist(st); err != nil {
		return nil, fmt.Errorf("manufacture card %s: %w", path, err)
	}
	return a, nil
}

// Open loads the card whose state lives at path.
func Open(path string) (*Applet, error) {
	a := &Applet{path: path, rand: rand.Reader}
	if err := a.st.load(path); err != nil {
		return nil, err
	}
	return a, nil
}

// SetRand replaces the card's random source; test vectors use it to fix r.
func (a *Applet) SetRand(r io.Reader) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rand = r
}

// ID returns the card's identifier.
func (a *Applet) ID() []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	return bytes.Clone(a.st.ID)
}

// LifeCycle returns the card's persistent life-cycle state.
func (a *Applet) LifeCycle() protocol.LifeCycle {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st.LifeCycle
}

// Attested reports whether the card has an attestation key (§10).
func (a *Applet) Attested() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st.attestKey != nil
}

// Path is the card's state file.
func (a *Applet) Path() string { return a.path }

// ATR returns the answer to reset.
func (a *Applet) ATR() []byte { return bytes.Clone(ATR) }

// PowerOn, PowerOff and Reset end the session.
func (a *Applet) PowerOn()  { a.resetSession() }
func (a *Applet) PowerOff() { a.resetSession() }
func (a *Applet) Reset()    { a.resetSession() }

func (a *Applet) resetSession() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.selected, a.chain, a.pending = false, nil, nil
}

// persist makes st the card's persistent state, atomically; a.st changes
// only once it is durable.
func (a *Applet) persist(st state) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	if err := writeState(a.path, append(b, '\n')); err != nil {
		return err
	}
	a.st = st
	return nil
}

// Transmit processes one C-APDU and returns the R-APDU. It never panics on
// malformed input: every error is a status word.
func (a *Applet) Transmit(capdu []byte) []byte {
	a.mu.Lock()
	defer a.mu.Unlock()
	data, sw := a.dispatch(capdu)
	return iso7816.Response{Data: data, SW: sw}.Bytes()
}

func (a *Applet) dispatch(capdu []byte) ([]byte, iso7816.SW) {
	cmd, err := iso7816.ParseCommand(capdu)
	if err != nil {
		a.chain, a.pending = nil, nil
		return nil, iso7816.SWWrongLength
	}
	pending := a.pending
	a.pending = nil // any command but GET RESPONSE drops them

	if sw, ok := checkCLA(cmd.CLA); !ok {
		a.chain = nil
		return nil, sw
	}
	chaining := cmd.CLA&protocol.CLAChaining != 0
	if a.chain != nil && (cmd.INS != a.chain.ins || cmd.P1 != a.chain.p1 || cmd.P2 != a.chain.p2) {
		a.chain = nil
		if cmd.INS != protocol.INSSelect {
			return nil, iso7816.SWLastCommandExpected
		}
	}

	if cmd.INS == protocol.INSSelect {
		if cmd.CLA != protocol.CLAISO {
			return nil, iso7816.SWCLANotSupported
		}
		return a.selectApplet(cmd)
	}
	if !a.selected {
		return nil, iso7816.SWCommandNotAllowed
	}
	wantCLA := byte(protocol.CLAProprietary)
	if cmd.INS == protocol.INSGetResponse {
		wantCLA = protocol.CLAISO
	}
	if cmd.CLA&^protocol.CLAChaining != wantCLA {
		a.chain = nil
		return nil, iso7816.SWCLANotSupported
	}
	if chaining && cmd.INS != protocol.INSPersonalize {
		return nil, iso7816.SWChainingUnsupported
	}

	switch cmd.INS {
	case protocol.INSGetResponse:
		return a.getResponse(cmd, pending)
	case protocol.INSGetID:
		return a.simpleGet(cmd, a.st.ID)
	case protocol.INSGetStatus:
		return a.simpleGet(cmd, a.status().Marshal())
	case protocol.INSPersonalize:
		return a.personalize(cmd, chaining)
	case protocol.INSReadCiphertext:
		if sw := noData(cmd); sw != iso7816.SWOK {
			return nil, sw
		}
		if a.st.LifeCycle != protocol.Personalized {
			return nil, iso7816.SWConditionsNotMet
		}
		return a.respond(a.st.C, cmd.Ne)
	case protocol.INSLock:
		return a.lock(cmd)
	case protocol.INSAuthenticate:
		return a.authenticate(cmd)
	case protocol.INSGetAttestationChain:
		return a.attestationChain(cmd)
	case protocol.INSReadAttestation:
		return a.readAttestation(cmd)
	}
	return nil, iso7816.SWINSNotSupported
}

// checkCLA accepts the basic channel without secure messaging, in the
// interindustry (0x0X) and proprietary (0x8X) classes.
func checkCLA(cla byte) (iso7816.SW, bool) {
	switch cla & 0xE0 {
	case 0x00, 0x80:
	default:
		return iso7816.SWCLANotSupported, false
	}
	if cla&0x03 != 0 {
		return iso7816.SWLogicalChannel, false
	}
	if cla&0x0C != 0 {
		return iso7816.SWSecureMessaging, false
	}
	return iso7816.SWOK, true
}

// respond returns up to ne bytes of data and keeps the rest for GET
// RESPONSE, announcing it with 61xx.
func (a *Applet) respond(data []byte, ne int) ([]byte, iso7816.SW) {
	if len(data) <= ne {
		return data, iso7816.SWOK
	}
	a.pending = data[ne:]
	rest := len(a.pending)
	if rest > 255 {
		rest = 0 // 6100: 256 bytes or more
	}
	return data[:ne], iso7816.SWBytesRemaining | iso7816.SW(rest)
}

func (a *Applet) getResponse(cmd iso7816.Command, pending []byte) ([]byte, iso7816.SW) {
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return nil, iso7816.SWWrongP1P2
	}
	if len(cmd.Data) != 0 {
		return nil, iso7816.SWWrongLength
	}
	if len(pending) == 0 {
		return nil, iso7816.SWConditionsNotMet
	}
	return a.respond(pending, cmd.Ne)
}

func (a *Applet) selectApplet(cmd iso7816.Command) ([]byte, iso7816.SW) {
	a.selected = false
	if cmd.P1 != 0x04 || (cmd.P2 != 0x00 && cmd.P2 != 0x0C) {
		return nil, iso7816.SWWrongP1P2
	}
	if !bytes.Equal(cmd.Data, protocol.AID) {
		return nil, iso7816.SWAppletNotFound
	}
	a.selected = true
	if cmd.P2 == 0x0C {
		return nil, iso7816.SWOK
	}
	// FCI: 6F { 84 DF-name }
	fci := append([]byte{0x6F, byte(2 + len(protocol.AID)), 0x84, byte(len(protocol.AID))}, protocol.AID...)
	return a.respond(fci, cmd.Ne)
}

// noData checks that a command carries no data and has P1 = P2 = 0.
func noData(cmd iso7816.Command) iso7816.SW {
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return iso7816.SWWrongP1P2
	}
	if len(cmd.Data) != 0 {
		return iso7816.SWWrongLength
	}
	return iso7816.SWOK
}

func (a *Applet) simpleGet(cmd iso7816.Command, v []byte) ([]byte, iso7816.SW) {
	if sw := noData(cmd); sw != iso7816.SWOK {
		return nil, sw
	}
	return a.respond(bytes.Clone(v), cmd.Ne)
}

func (a *Applet) status() protocol.Status {
	s := protocol.Status{
		Version:   protocol.AppletVersion,
		State:     a.st.LifeCycle,
		ProfileID: a.st.ProfileID,
		Pinned:    len(a.st.Pinned) != 0,
		Attested:  a.st.attestKey != nil,
	}
	copy(s.Fingerprint[:], a.st.IssuerKey)
	copy(s.PinnedKey[:], a.st.Pinned)
	return s
}

func (a *Applet) personalize(cmd iso7816.Command, more bool) ([]byte, iso7816.SW) {
	if a.st.LifeCycle != protocol.Blank {
		a.chain = nil
		return nil, iso7816.SWConditionsNotMet
	}
	if a.chain == nil {
		a.chain = &chain{ins: cmd.INS, p1: cmd.P1, p2: cmd.P2}
	}
	if len(a.chain.data)+len(cmd.Data) > protocol.MaxChainedData {
		a.chain = nil
		return nil, iso7816.SWNotEnoughMemory
	}
	a.chain.data = append(a.chain.data, cmd.Data...)
	if more {
		return nil, iso7816.SWOK
	}
	spki := a.chain.data
	a.chain = nil

	p, err := protocol.ProfileByID(cmd.P1)
	if err != nil || cmd.P2 != 0 {
		return nil, iso7816.SWWrongP1P2
	}
	key, err := protocol.ParseIssuerKey(spki)
	if err != nil || key.Fits(p) != nil {
		return nil, iso7816.SWWrongData
	}
	fp := key.Fingerprint()
	if len(a.st.Pinned) != 0 && !bytes.Equal(a.st.Pinned, fp[:]) {
		return nil, iso7816.SWSecurityStatus
	}
	s, c, err := protocol.Encapsulate(p, key, a.rand)
	if err != nil {
		return nil, iso7816.SWUnknown
	}
	ki, err := protocol.DeriveKey(p, s, protocol.Binding(p, key.SPKI))
	clear(s) // r is never stored: only K_I and c survive this command
	if err != nil {
		return nil, iso7816.SWUnknown
	}
	next := a.st
	next.LifeCycle = protocol.Personalized
	next.ProfileID = p.ID
	next.IssuerKey = fp[:]
	next.KI = ki
	next.C = c
	if a.st.attestKey != nil {
		sig, err := a.attest(p, fp[:], c)
		if err != nil {
			return nil, iso7816.SWUnknown
		}
		next.AttestSig = sig
	}
	if err := a.persist(next); err != nil {
		return nil, iso7816.SWMemoryFailure
	}
	return a.respond(bytes.Clone(c), cmd.Ne)
}

func (a *Applet) lock(cmd iso7816.Command) ([]byte, iso7816.SW) {
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return nil, iso7816.SWWrongP1P2
	}
	if len(cmd.Data) != sha256.Size {
		return nil, iso7816.SWWrongLength
	}
	if a.st.LifeCycle != protocol.Personalized {
		return nil, iso7816.SWConditionsNotMet
	}
	h := sha256.Sum256(a.st.C)
	if !bytes.Equal(cmd.Data, h[:]) {
		return nil, iso7816.SWWrongData
	}
	next := a.st
	next.LifeCycle = protocol.Locked
	next.C = nil
	next.AttestSig = nil // §10.2: erased with c
	if err := a.persist(next); err != nil {
		return nil, iso7816.SWMemoryFailure
	}
	return nil, iso7816.SWOK
}

func (a *Applet) authenticate(cmd iso7816.Command) ([]byte, iso7816.SW) {
	if cmd.P1 != 0 || cmd.P2 != 0 {
		return nil, iso7816.SWWrongP1P2
	}
	if len(cmd.Data) != protocol.ChallengeLen {
		return nil, iso7816.SWWrongLength
	}
	if a.st.LifeCycle != protocol.Locked {
		return nil, iso7816.SWConditionsNotMet
	}
	mac, err := protocol.AuthMAC(a.st.KI, a.st.ID, cmd.Data)
	if err != nil {
		return nil, iso7816.SWUnknown
	}
	return a.respond(mac, cmd.Ne)
}

// attest signs A of §10.2 for the c just made. Its nonce comes from
// crypto/rand, never from a.rand: the §8 vectors fix every byte the
// protocol draws, and an attested card must draw the same ones.
func (a *Applet) attest(p protocol.Profile, fp, c []byte) ([]byte, error) {
	ch := sha256.Sum256(c)
	msg, err := protocol.AttestMessage(a.st.ID, p.Name, fp, ch[:])
	if err != nil {
		return nil, err
	}
	h := sha256.Sum256(msg)
	return ecdsa.SignASN1(rand.Reader, a.st.attestKey, h[:])
}

// attestationChain answers GET ATTESTATION CHAIN in every state; the
// chain is longer than one short response, so it goes out through
// respond and GET RESPONSE.
func (a *Applet) attestationChain(cmd iso7816.Command) ([]byte, iso7816.SW) {
	if sw := noData(cmd); sw != iso7816.SWOK {
		return nil, sw
	}
	if a.st.attestKey == nil {
		return nil, iso7816.SWDataNotFound
	}
	return a.respond(a.st.chainBytes(), cmd.Ne)
}

// readAttestation answers READ ATTESTATION: the signature persisted with
// c, as often as asked, between PERSONALIZE and LOCK.
func (a *Applet) readAttestation(cmd iso7816.Command) ([]byte, iso7816.SW) {
	if sw := noData(cmd); sw != iso7816.SWOK {
		return nil, sw
	}
	if a.st.attestKey == nil {
		return nil, iso7816.SWDataNotFound
	}
	if a.st.LifeCycle != protocol.Personalized {
		return nil, iso7816.SWConditionsNotMet
	}
	return a.respond(bytes.Clone(a.st.AttestSig), cmd.Ne)
}
