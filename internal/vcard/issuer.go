package vcard

import (
	"context"
	"errors"
	"fmt"

	"blindperso/api"
	"blindperso/card"
	"blindperso/protocol"
)

// Result of an authentication when the issuer gave no challenge.
const ResultNotActive = "not-active"

// Authentication is one run of the paper's key-integrity check for one
// virtual card through the issuer.
type Authentication struct {
	ID         protocol.Hex `json:"id"`
	Challenge  protocol.Hex `json:"challenge,omitempty"`
	MAC        protocol.Hex `json:"mac,omitempty"`
	Result     string       `json:"result"` // api.VerifyResult.Result, or ResultNotActive
	FailedAuth int          `json:"failed_auth"`
}

// OK reports whether the issuer accepted the card's MAC.
func (a Authentication) OK() bool { return a.Result == api.ResultOK }

// Authenticate plays the terminal between the virtual card in the state
// file path and the issuer: GET a challenge for the card's Id, send the
// card AUTHENTICATE (in process, docs/PROTOCOL.md §4), post its MAC. A
// card the issuer gives no challenge (blocked, in conflict) is
// ResultNotActive, not an error; errors are for everything else (no such
// card at the issuer, a card that is not locked, the network).
func Authenticate(ctx context.Context, c *api.Client, path string) (Authentication, error) {
	a, err := card.Open(path)
	if err != nil {
		return Authentication{}, err
	}
	out := Authentication{ID: a.ID()}
	ch, err := c.Challenge(ctx, a.ID())
	if errors.Is(err, api.ErrConflict) {
		out.Result = ResultNotActive
		return out, nil
	}
	if err != nil {
		return out, err
	}
	out.Challenge = ch.Challenge
	cl := &card.Client{T: a.Local()}
	if err := cl.Select(); err != nil {
		return out, fmt.Errorf("%s: %w", path, err)
	}
	if out.MAC, err = cl.Authenticate(ch.Challenge); err != nil {
		return out, fmt.Errorf("%s: %w", path, err)
	}
	res, err := c.Verify(ctx, a.ID(), ch.Challenge, out.MAC)
	if err != nil {
		return out, err
	}
	out.Result, out.FailedAuth = res.Result, res.FailedAuth
	return out, nil
}
