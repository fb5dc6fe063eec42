package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/miekg/pkcs11"
	"github.com/spf13/cobra"

	"blindperso/hsm"
	"blindperso/issuer"
)

// memberHelp is the help of the commands that take several tokens.
const memberHelp = `--token may be given several times (or $` + envToken + ` may hold several
URIs separated by spaces or newlines) for tokens that hold the same issuer
key and KEK under the same labels: members of an HSM group without one
virtual slot, or SoftHSM2 tokens replicated by the key ceremony
(docs/OPERATIONS.md). At start the issuer proves they hold the same keys
without reading any secret (equal public-key fingerprints, then one
throwaway card imported on every member must give the same wrapped key)
and refuses a member that differs, naming it and why. Imports and
verifications then go to the healthy member with the least work in
flight; a member that fails as a device (CKR_DEVICE_ERROR,
CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, sessions that cannot be
reopened) or does not answer within --member-deadline is taken out, the
record or verification in flight is redone on another member, and the
member is re-probed every second until it answers with the group's keys.
A member whose token is down at start (not present, not answering) is
started out and re-probed the same way; a wrong PIN or a missing key
stops the start.`

// issuerFlags adds --token (repeatable), --key, --kek and
// --member-deadline, and returns a function that opens every token, finds
// both keys in each and makes their hsm.Group. gated commands (import,
// serve) also audit each member's keys and refuse weak ones
// (weakKeyGate). Close what it returns with closeIssuer.
func issuerFlags(c *cobra.Command, gated bool) func(ctx context.Context, sessions int) (*issuer.Issuer, error) {
	uris := c.Flags().StringArray("token", nil, "PKCS#11 URI of the token; repeat for the members of a group (default $"+envToken+")")
	gate := func(context.Context, *issuer.Issuer) error { return nil }
	if gated {
		gate = weakKeyGate(c)
	}
	key := c.Flags().String("key", "", "label of the issuer key in the token (required)")
	kek := c.Flags().String("kek", "", "label of the KEK in the token (required)")
	deadline := c.Flags().Duration("member-deadline", hsm.DefaultDeadline, "with several --token: how long one token operation may take before its member is taken out and the work redone on another; 0: no deadline (device errors still fail over, a hung call is waited for; faster: docs/BENCHMARKS.md)")
	c.MarkFlagRequired("key")
	c.MarkFlagRequired("kek")
	return func(ctx context.Context, sessions int) (is *issuer.Issuer, err error) {
		list, err := tokenURIs(*uris)
		if err != nil {
			return nil, err
		}
		if *deadline < 0 {
			return nil, fmt.Errorf("--member-deadline %v: must be positive, or 0 for none", *deadline)
		}
		groupDeadline := *deadline
		if groupDeadline == 0 {
			groupDeadline = hsm.NoDeadline
		}
		var members []hsm.Member
		var pending []hsm.Pending
		defer func() {
			if err != nil {
				for _, m := range members {
					m.Token.Close()
				}
			}
		}()
		for i, u := range list {
			open := func(ctx context.Context) (hsm.Member, error) {
				m, err := openMember(ctx, u, sessions, *key, *kek)
				if err != nil {
					return m, err
				}
				if err := gate(ctx, &issuer.Issuer{Token: m.Token, Key: m.Key, KEK: m.KEK}); err != nil {
					m.Token.Close()
					return hsm.Member{}, err
				}
				return m, nil
			}
			m, err := open(ctx)
			switch {
			case err == nil:
				members = append(members, m)
			case len(list) > 1 && downAtStart(err):
				// Its HSM is down (in maintenance, say): start without
				// it; the group opens it when it is back.
				pending = append(pending, hsm.Pending{Name: tokenName(u, i), Open: open, Err: err})
			case len(list) > 1:
				return nil, fmt.Errorf("token %d of %d: %w", i+1, len(list), err)
			default:
				return nil, err
			}
		}
		if len(members) == 0 {
			return nil, fmt.Errorf("no token of the group could be opened: %w", errors.Join(pendingErrs(pending)...))
		}
		log := slog.New(slog.NewTextHandler(c.ErrOrStderr(), nil))
		g, err := hsm.NewGroup(ctx, members, hsm.GroupOptions{Deadline: groupDeadline, Log: log, Pending: pending})
		if err != nil {
			return nil, err
		}
		if len(members)+len(pending) > 1 {
			log.Info("token group: every member holds the same issuer key and KEK", "members", len(members), "pending", len(pending), "key", *key, "kek", *kek)
		}
		first := members[0]
		return &issuer.Issuer{Token: first.Token, Key: first.Key, KEK: first.KEK, Group: g}, nil
	}
}

// downAtStart says whether a member that failed to open is down, not
// misconfigured: the group starts without it. A wrong PIN, a missing key
// or library is the operator's to fix, and stops the start.
func downAtStart(err error) bool {
	return hsm.Unavailable(err) && !hsm.IsRV(err, pkcs11.CKR_PIN_INCORRECT) && !hsm.IsRV(err, pkcs11.CKR_PIN_LOCKED)
}

// tokenName names a member that could not be opened: its URI's token
// label or serial, else its place.
func tokenName(uri string, i int) string {
	if cfg, err := hsm.ParseURI(uri); err == nil {
		if cfg.TokenLabel != "" {
			return cfg.TokenLabel
		}
		if cfg.Serial != "" {
			return "serial " + cfg.Serial
		}
	}
	return fmt.Sprintf("token %d", i+1)
}

func pendingErrs(ps []hsm.Pending) []error {
	errs := make([]error, len(ps))
	for i, p := range ps {
		errs[i] = fmt.Errorf("%s: %w", p.Name, p.Err)
	}
	return errs
}

// openMember opens one token and finds the issuer key and the KEK in it.
func openMember(ctx context.Context, uri string, sessions int, key, kek string) (hsm.Member, error) {
	tok, err := hsm.OpenURI(uri, sessions)
	if err != nil {
		return hsm.Member{}, err
	}
	k, err := tok.FindIssuerKey(ctx, key)
	if err != nil {
		tok.Close()
		return hsm.Member{}, err
	}
	w, err := tok.FindKEK(ctx, kek)
	if err != nil {
		tok.Close()
		return hsm.Member{}, err
	}
	return hsm.Member{Token: tok, Key: k, KEK: w}, nil
}

// closeIssuer stops the group's re-probing, destroys the session copies
// and closes every member's token. A member hung in a call (the reason it
// was taken out) would hold its Close forever, so the whole closing is
// given ten seconds; the process exits anyway after that.
func closeIssuer(is *issuer.Issuer) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		is.Close(ctx)
		if is.Group == nil {
			is.Token.Close()
			return
		}
		for _, m := range is.Group.Members() {
			m.Token.Close()
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
		slog.Warn("closing the tokens took too long (a member hung in a call?); exiting without")
	}
}
