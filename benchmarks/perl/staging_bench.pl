#!/usr/bin/perl
# Driver of the Perl baseline (benchmarks/bench_perl.py): the original VM::EC2::Staging
# (Debian's libvm-ec2-perl) doing the benchmark's jobs, step by step, on request.
#
# Reads one JSON request per line on stdin, answers one JSON line on stdout:
#   {"op": "fleet", "names": ["a", "b"]}          -> get_server(-name => ...) each, in turn
#   {"op": "commands", "server": "w", "n": 100}   -> n x $server->scmd('echo ok')
#   {"op": "volume", "server": "w", "name": "v", "size": 1, "fstype": "ext4"}  (set-up)
#   {"op": "ssh", "server": "w", "command": "..."}            (set-up: a shell command)
#   {"op": "put", "source": "/local/dir/", "volume": "v"}     -> $manager->rsync(src, "$vol/")
#   {"op": "rsync", "from": "v1", "to": "v2"}                  -> $manager->rsync("$v1/", "$v2/")
#   {"op": "unmount", "volume": "v"}                           (set-up: $vol->unmount)
#   {"op": "dd", "from": "v1", "to": "v2"}                     -> $manager->dd($v1 => $v2)
#   {"op": "terminate", "names": ["a"]}                        (clean-up)
#   {"op": "quit"}
# Answer: {"ok": true, "seconds": <wall time of the timed part>, ...} or
#         {"ok": false, "error": "<what VM::EC2 said>"}.
# The EC2 endpoint and credentials come from EC2_URL, EC2_ACCESS_KEY, EC2_SECRET_KEY
# (VM::EC2's own variables); the image, login user and key directory from the
# arguments: staging_bench.pl IMAGE_ID USERNAME DOTDIR ZONE
# Everything the module prints goes to stderr: stdout carries the answers only.
use strict;
use warnings;
use JSON::PP;
use Time::HiRes qw(time);
use IO::Handle;
use VM::EC2;
use VM::EC2::Staging::Manager;

my ($image, $username, $dotdir, $zone) = @ARGV;
die "usage: $0 IMAGE_ID USERNAME DOTDIR ZONE\n" unless $zone;

# Answers go to a copy of stdout; stdout itself (the module's prints, and the ssh and
# rsync it runs) goes to stderr.
open my $out, '>&', \*STDOUT or die "dup stdout: $!";
$out->autoflush(1);
open STDOUT, '>&', \*STDERR or die "stdout to stderr: $!";
my $json = JSON::PP->new->canonical;

my $ec2 = VM::EC2->new(-raise_error => 1);   # EC2_URL, EC2_ACCESS_KEY, EC2_SECRET_KEY
my $manager = $ec2->staging_manager(
    -on_exit           => 'terminate',
    -verbose           => 0,
    -scan              => 0,
    -dotdir            => $dotdir,
    -image_name        => $image,
    -architecture      => 'x86_64',
    -username          => $username,
    # the module's own default (m1.small, a Xen type): it names devices the Xen way
    # (/dev/xvda1, /dev/sdf1 -> /dev/xvdf1) and cannot find a device on Nitro (NVMe) types
    -availability_zone => $zone,
);
my %volumes;   # name -> VM::EC2::Staging::Volume

sub server_named {
    my $name = shift;
    my ($server) = grep { $_->name eq $name } $manager->servers;
    return $server || $manager->get_server(-name => $name);
}

sub volume_named {
    my $name = shift;
    return $volumes{$name} || die "no volume named $name\n";
}

sub timed {
    my $code = shift;
    my $t    = time;
    my $ok   = $code->();
    my $s    = time - $t;
    die "the step returned false\n" unless $ok;
    return { seconds => $s };
}

my %ops = (
    fleet => sub {
        my $r = shift;
        return timed(sub { server_named($_) for @{ $r->{names} }; 1 });
    },
    commands => sub {
        my $r      = shift;
        my $server = server_named($r->{server});
        return timed(sub {
            for (1 .. $r->{n}) {
                my $answer = $server->scmd('echo ok');
                die "scmd gave '$answer'\n" unless $answer eq "ok\n";
            }
            1;
        });
    },
    volume => sub {
        my $r      = shift;
        my $server = server_named($r->{server});
        my $vol    = $server->provision_volume(
            -name => $r->{name}, -size => $r->{size}, -fstype => $r->{fstype} || 'ext4');
        $volumes{ $r->{name} } = $vol;
        return { volume_id => "$vol", mtpt => $vol->mtpt, mtdev => $vol->mtdev };
    },
    ssh => sub {
        my $r = shift;
        server_named($r->{server})->ssh($r->{command}) or die "command failed: $r->{command}\n";
        return {};
    },
    put => sub {
        my $r   = shift;
        my $vol = volume_named($r->{volume});
        return timed(sub { $manager->rsync($r->{source}, "$vol/") });
    },
    rsync => sub {
        my $r = shift;
        my ($from, $to) = (volume_named($r->{from}), volume_named($r->{to}));
        return timed(sub { $manager->rsync("$from/", "$to/") });
    },
    unmount => sub {
        my $r = shift;
        volume_named($r->{volume})->unmount;
        return {};
    },
    dd => sub {
        my $r = shift;
        my ($from, $to) = (volume_named($r->{from}), volume_named($r->{to}));
        return timed(sub { $manager->dd($from => $to) });
    },
    terminate => sub {
        my $r     = shift;
        my %names = map { $_ => 1 } @{ $r->{names} };
        my @gone  = grep { $names{ $_->name } } $manager->servers;
        $manager->_terminate_servers(@gone) if @gone;
        return { terminated => scalar @gone };
    },
);

while (my $line = <STDIN>) {
    my $request = eval { $json->decode($line) } or next;
    last if $request->{op} eq 'quit';
    my $answer = eval {
        my $op = $ops{ $request->{op} } or die "unknown op $request->{op}\n";
        my $result = $op->($request);
        { ok => JSON::PP::true, %$result };
    };
    unless ($answer) {
        (my $error = $@ || 'unknown error') =~ s/\s+$//;
        $answer = { ok => JSON::PP::false, error => $error };
    }
    $out->print($json->encode($answer), "\n");
}
$manager->terminate_all_servers;
