// segserve auth proxy: the bearer-token check nginx.conf runs (js_set $segserve_auth auth.check)
// on every request that needs a token, REST and gRPC alike (a gRPC client's `authorization`
// metadata is the same HTTP/2 header).
//
// Tokens: the Secret segserve-api-tokens, key `tokens`, mounted as the file named by
// $segserve_tokens_file. One token per line; blank lines and lines starting with # are
// ignored; several lines let a rotation overlap (add the new token, move the clients, remove
// the old one). The file is read on every request: njs keeps nothing between requests, and
// kubelet replaces the file by swapping its ..data symlink, so a rotation takes effect with
// no reload or restart. It is a few bytes in the page cache.
//
// Written for njs 0.7 (Debian bookworm) and later (the official nginx image): no for-of,
// which njs 0.7 lacks.

import fs from 'fs';

// check(r) -> "ok", "missing" (no bearer token sent), "invalid" (not one of the tokens) or
// "unconfigured" (no token file, unreadable or no token in it: everything is refused).
function check(r) {
    const path = r.variables.segserve_tokens_file;
    let tokens;
    try {
        tokens = parseTokens(fs.readFileSync(path, 'utf8'));
    } catch (e) {
        r.error(`segserve auth: cannot read the token file ${path} (${e.message}): every `
                + 'request that needs a token is refused; mount the segserve-api-tokens Secret');
        return 'unconfigured';
    }
    if (tokens.length === 0) {
        r.error(`segserve auth: the token file ${path} holds no token: every request that `
                + 'needs a token is refused; add one to the segserve-api-tokens Secret');
        return 'unconfigured';
    }
    const sent = bearerToken(r.variables.http_authorization);
    if (sent === null) {
        return 'missing';
    }
    // Every token is compared, each in constant time, so the answer's timing tells nothing
    // about how much of a guess was right.
    let found = false;
    for (let i = 0; i < tokens.length; i++) {
        found = sameString(tokens[i], sent) || found;
    }
    if (!found) {
        // Never the token itself: logs are shipped to collectors.
        r.warn(`segserve auth: a bearer token that is not in ${path} (from ${r.remoteAddress})`);
        return 'invalid';
    }
    return 'ok';
}

function parseTokens(text) {
    return text.split('\n')
        .map((line) => line.trim())
        .filter((line) => line !== '' && !line.startsWith('#'));
}

// The token of "Bearer <token>" (the scheme is case-insensitive, RFC 7235), else null.
function bearerToken(header) {
    const match = /^Bearer +(\S+) *$/i.exec(header || '');
    return match ? match[1] : null;
}

function sameString(a, b) {
    if (a.length !== b.length) {
        return false;
    }
    let diff = 0;
    for (let i = 0; i < a.length; i++) {
        diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
    }
    return diff === 0;
}

export default { check };
